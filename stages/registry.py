"""The stages by name: the single entry point used by the CLI, the container image and the flows.

Running a stage here also reports it: its metrics and seconds go to the training run in MLflow (step = iteration)
and its Parquet URIs become tags, so every way of launching a stage leaves the same trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from transformers.utils import logging as transformers_logging

from dypo.stages import tracking
from dypo.stages.commit import StageOutcome
from dypo.stages.context import RunContext, open_run
from dypo.stages.evaluate import evaluate
from dypo.stages.filter import filter_batch
from dypo.stages.optimize import optimize
from dypo.stages.publish import publish
from dypo.stages.rollout import rollout
from dypo.stages.warmstart import warmstart

console = Console(stderr=True)
transformers_logging.disable_progress_bar()  # our own progress display covers the stages

STAGE_NAMES = ("warmstart", "rollout", "filter", "optimize", "publish", "evaluate")
_HEADLINE = {"success_rate", "mean_return", "accepted_groups", "accepted_episodes", "loss", "sft_loss",
             "grad_norm", "clip_fraction", "model_version", "promoted", "generated_tokens_per_s"}


@dataclass(frozen=True)
class StageSummary:
    """What a flow needs to know about a finished stage (small and serialisable)."""

    stage: str
    iteration: int
    skipped: bool
    seconds: float
    metrics: dict[str, float]
    details: dict[str, str]


def _launch(name: str, ctx: RunContext, iteration: int, draw: int, force: bool) -> StageOutcome:
    stages: dict[str, Callable[[], StageOutcome]] = {
        "warmstart": lambda: warmstart(ctx, iteration, force),
        "rollout": lambda: rollout(ctx, iteration, draw, force),
        "filter": lambda: filter_batch(ctx, iteration, force),
        "optimize": lambda: optimize(ctx, iteration, force),
        "publish": lambda: publish(ctx, iteration, force),
        "evaluate": lambda: evaluate(ctx, iteration, force),
    }
    if name not in stages:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGE_NAMES)}")
    return stages[name]()



def run_stage(run_uri: str, name: str, iteration: int, draw: int = 0, force: bool = False) -> StageSummary:
    """Run (or skip, when already committed with the same inputs) one stage of one iteration of a run."""
    ctx = open_run(run_uri)
    outcome = _launch(name, ctx, iteration, draw, force)
    manifest = outcome.committed.manifest
    seconds = manifest.timings["seconds"]
    label = outcome.committed.directory.split("/")[-1]
    if outcome.skipped:
        console.print(f"[dim]- iter {iteration} {label}: already committed, skipped[/dim]")
    else:
        shown = {k: v for k, v in manifest.metrics.items() if k in _HEADLINE}
        console.print(f"[green]✓[/green] iter {iteration} [bold]{label}[/bold] {seconds:.1f}s "
                      + " ".join(f"{k}={v:.3g}" for k, v in shown.items()))
        metrics = {f"{label}/{k}": v for k, v in manifest.metrics.items()}
        metrics[f"time/{label}_s"] = seconds
        parquet = {f"parquet.iter-{iteration:06d}.{label}.{o.path.removesuffix('.parquet')}":
                   ctx.store.uri_of(f"{outcome.committed.directory}/{o.path}")
                   for o in manifest.outputs if o.path.endswith(".parquet")}
        tracking.log_iteration(ctx, iteration, metrics, parquet)
    return StageSummary(name, iteration, outcome.skipped, seconds, manifest.metrics, manifest.details)

