"""Prefect flows: the on-policy training loop, and a rerun of any single stage of any past iteration.

Flows only orchestrate: every step is `run_stage`, a plain function that skips work already committed with the
same inputs. Rerunning `train` on the same run URI therefore resumes after the last committed stage.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dypo.stages.context import open_run
from dypo.stages.registry import StageSummary, run_stage


@task(cache_policy=NO_CACHE, task_run_name="{name}-iter{iteration}-draw{draw}")
def stage_task(run_uri: str, name: str, iteration: int, draw: int = 0, force: bool = False) -> StageSummary:
    return run_stage(run_uri, name, iteration, draw=draw, force=force)


def _publish_and_evaluate(run_uri: str, iteration: int) -> StageSummary:
    stage_task(run_uri, "publish", iteration)
    return stage_task(run_uri, "evaluate", iteration)


def train_iteration(run_uri: str, iteration: int) -> StageSummary:
    """rollout → filter (→ auxiliary rollout → filter …) → optimize → publish → evaluate."""
    extra_draws = open_run(run_uri).config.filter.max_extra_draws
    for draw in range(1 + extra_draws):
        stage_task(run_uri, "rollout", iteration, draw=draw)
        batch = stage_task(run_uri, "filter", iteration)
        if not batch.metrics["short"]:
            break
    stage_task(run_uri, "optimize", iteration)
    return _publish_and_evaluate(run_uri, iteration)


@flow(name="dypo-train")
def train(run_uri: str) -> list[StageSummary]:
    """Warmstart (iteration 0, evaluated as the baseline), then the configured number of DyPO iterations.

    Returns the evaluate summary of every iteration, baseline first.
    """
    stage_task(run_uri, "warmstart", 0)
    evaluations = [_publish_and_evaluate(run_uri, 0)]
    for iteration in range(1, open_run(run_uri).config.run.iterations + 1):
        evaluations.append(train_iteration(run_uri, iteration))
    return evaluations


@flow(name="dypo-rerun-stage")
def rerun_stage(run_uri: str, stage: str, iteration: int, draw: int = 0, force: bool = True) -> StageSummary:
    """One stage of one past iteration, rewritten by default; later stages see new inputs and rerun on resume."""
    return stage_task(run_uri, stage, iteration, draw=draw, force=force)
