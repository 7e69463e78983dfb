"""Prefect flows: the on-policy training loop, and a rerun of any single stage of any past iteration.

Flows only orchestrate: every step launches one stage through the configured launcher (in this process, in
containers, or as Prefect deployments, see flows/launchers.py), as N shard jobs side by side for rollout and
evaluate when configured, and then reads what the stage committed. A stage skips work already committed with the
same inputs, so rerunning `train` on the same run URI resumes after the last committed stage.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from dypo.flows.launchers import Launcher, StageJob, launcher_for
from dypo.stages.commit import read_committed, require_committed, rollout_stage_name
from dypo.stages.context import open_run
from dypo.stages.registry import StageSummary


@task(cache_policy=NO_CACHE, task_run_name="{job.label}")
def stage_job(launcher: Launcher, job: StageJob) -> None:
    launcher.run(job)


def launch_stage(run_uri: str, name: str, iteration: int, draw: int = 0, force: bool = False) -> StageSummary:
    """Run one stage (all its shards) through the run's launcher and return what it committed."""
    ctx = open_run(run_uri)
    launch = ctx.config.launch
    shards = getattr(launch.shards, name, 1)
    jobs = [StageJob(run_uri, name, iteration, draw, f"{i}/{shards}" if shards > 1 else None, force)
            for i in range(shards)]
    directory = rollout_stage_name(draw) if name == "rollout" else name
    before = read_committed(ctx.store, directory, iteration)
    launcher = launcher_for(launch, run_uri, ctx.config.tracking.mlflow_uri)
    if launcher.parallel and len(jobs) > 1:
        futures = [stage_job.submit(launcher, job) for job in jobs]
        wait(futures)
        for future in futures:
            future.result()
    else:
        for job in jobs:
            stage_job(launcher, job)
    committed = require_committed(ctx.store, directory, iteration)
    return StageSummary.of(name, iteration, committed, skipped=before is not None and before.sha256 == committed.sha256)


def _publish_and_evaluate(run_uri: str, iteration: int) -> StageSummary:
    launch_stage(run_uri, "publish", iteration)
    return launch_stage(run_uri, "evaluate", iteration)


def train_iteration(run_uri: str, iteration: int) -> StageSummary:
    """rollout → filter (→ auxiliary rollout → filter …) → optimize → publish → evaluate."""
    extra_draws = open_run(run_uri).config.filter.max_extra_draws
    for draw in range(1 + extra_draws):
        launch_stage(run_uri, "rollout", iteration, draw=draw)
        batch = launch_stage(run_uri, "filter", iteration)
        if not batch.metrics["short"]:
            break
    launch_stage(run_uri, "optimize", iteration)
    return _publish_and_evaluate(run_uri, iteration)


@flow(name="dypo-train")
def train(run_uri: str) -> list[StageSummary]:
    """Warmstart (iteration 0, evaluated as the baseline), then the configured number of DyPO iterations.

    Returns the evaluate summary of every iteration, baseline first.
    """
    launch_stage(run_uri, "warmstart", 0)
    evaluations = [_publish_and_evaluate(run_uri, 0)]
    for iteration in range(1, open_run(run_uri).config.run.iterations + 1):
        evaluations.append(train_iteration(run_uri, iteration))
    return evaluations


@flow(name="dypo-rerun-stage")
def rerun_stage(run_uri: str, stage: str, iteration: int, draw: int = 0, force: bool = True) -> StageSummary:
    """One stage of one past iteration, rewritten by default; later stages see new inputs and rerun on resume."""
    return launch_stage(run_uri, stage, iteration, draw=draw, force=force)
