"""The flow of every per-stage Prefect deployment (flows/prefect.yaml): exactly one stage job, or one shard of it.

On a cluster each stage's deployment runs this in its own Kubernetes job and image; the training flow starts it
with `run_deployment` (flows/launchers.py) and reads the result from the run's storage.
"""

from __future__ import annotations

from prefect import flow

from dypo.stages.registry import StageSummary, run_stage
from dypo.stages.shards import Shard


@flow(name="dypo-stage")
def run_one_stage(run_uri: str, stage: str, iteration: int, draw: int = 0, shard: str | None = None,
                  force: bool = False) -> StageSummary:
    """Run (or skip, when committed with the same inputs) stage `stage` of `iteration`; `shard` is "i/N"."""
    return run_stage(run_uri, stage, iteration, draw=draw, force=force, shard=Shard.parse(shard) if shard else None)
