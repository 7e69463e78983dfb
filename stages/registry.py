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
from dypo.stages.commit import CommittedStage, StageOutcome
from dypo.stages.context import RunContext, open_run
from dypo.stages.evaluate import evaluate
from dypo.stages.filter import filter_batch
from dypo.stages.optimize import optimize
from dypo.stages.publish import publish
from dypo.stages.rollout import rollout
from dypo.stages.shards import Shard
from dypo.stages.trainer import launch_rank
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

    @classmethod
    def of(cls, stage: str, iteration: int, committed: CommittedStage, skipped: bool) -> StageSummary:
        manifest = committed.manifest
        return cls(stage, iteration, skipped, manifest.timings["seconds"], manifest.metrics, manifest.details)


FAN_OUT_STAGES = ("rollout", "evaluate")


def _launch(name: str, ctx: RunContext, iteration: int, draw: int, force: bool, shard: Shard | None,
            ) -> StageOutcome:
    stages: dict[str, Callable[[], StageOutcome]] = {
        "warmstart": lambda: warmstart(ctx, iteration, force),
        "rollout": lambda: rollout(ctx, iteration, draw, force, shard),
        "filter": lambda: filter_batch(ctx, iteration, force),
        "optimize": lambda: optimize(ctx, iteration, force),
        "publish": lambda: publish(ctx, iteration, force),
        "evaluate": lambda: evaluate(ctx, iteration, force, shard),
    }
    if name not in stages:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGE_NAMES)}")
    if shard is not None and name not in FAN_OUT_STAGES:
        raise ValueError(f"stage {name!r} runs as one job; only {' and '.join(FAN_OUT_STAGES)} run in shards")
    return stages[name]()


def _parquet_tags(ctx: RunContext, iteration: int, committed: CommittedStage) -> dict[str, str]:
    """One tag per table: its file, or the folder of its part files when the stage ran in shards."""
    label = committed.directory.split("/")[-1]
    tags = {}
    for output in committed.manifest.outputs:
        if output.path.endswith(".parquet"):
            table, sharded, _ = output.path.partition("/part-")
            location = f"{table}/" if sharded else table
            tags[f"parquet.iter-{iteration:06d}.{label}.{table.removesuffix('.parquet')}"] = ctx.store.uri_of(
                f"{committed.directory}/{location}")
    return tags


def run_stage(run_uri: str, name: str, iteration: int, draw: int = 0, force: bool = False,
              shard: Shard | None = None) -> StageSummary:
    """Run (or skip, when already committed with the same inputs) one stage of one iteration of a run.

    With `shard`, runs that shard of a fan-out stage; until all its shards are in, the summary is the shard's
    own (details["shard"] = "i/N").
    """
    ctx = open_run(run_uri)
    outcome = _launch(name, ctx, iteration, draw, force, shard)
    if outcome.committed is None and outcome.shard is None:  # a rank of a distributed optimize other than 0
        rank = launch_rank()
        console.print(f"[green]✓[/green] iter {iteration} [bold]{name}[/bold] rank {rank}: took part; "
                      "rank 0 commits the stage")
        return StageSummary(name, iteration, skipped=False, seconds=0.0, metrics={}, details={"rank": str(rank)})
    if outcome.committed is None:
        part = outcome.shard.manifest
        state = "already played" if outcome.skipped else f"{part.timings['seconds']:.1f}s"
        console.print(f"[green]✓[/green] iter {iteration} [bold]{outcome.shard.directory.split('/')[-2]}[/bold] "
                      f"shard {shard} {state}; the stage commits when all its shards are in")
        return StageSummary.of(name, iteration, outcome.shard, outcome.skipped)
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
        tracking.log_iteration(ctx, iteration, metrics, _parquet_tags(ctx, iteration, outcome.committed))
    return StageSummary.of(name, iteration, outcome.committed, outcome.skipped)
