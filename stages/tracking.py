"""MLflow bookkeeping: one MLflow run per training run, and the model registry.

The MLflow run is found by the tag `dypo.run_uri`, not remembered in process state, so any stage in any process
(or container) logs into the same run, and a rerun of one stage overwrites that iteration's metrics.
"""

from __future__ import annotations

import logging
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dypo.stages.context import RunContext

RUN_TAG = "dypo.run_uri"
CANDIDATE = "candidate"
CHAMPION = "champion"
SUCCESS_TAG = "eval_success_rate"

logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


def client(ctx: RunContext) -> MlflowClient:
    return MlflowClient(tracking_uri=ctx.config.tracking.mlflow_uri, registry_uri=ctx.config.tracking.mlflow_uri)


def training_run_id(ctx: RunContext) -> str:
    """The MLflow run of this training run, created with the run's params on first use."""
    mlflow = client(ctx)
    experiment = mlflow.get_experiment_by_name(ctx.config.tracking.experiment)
    experiment_id = (experiment.experiment_id if experiment else
                     mlflow.create_experiment(ctx.config.tracking.experiment))
    found = mlflow.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{ctx.store.uri}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    run = mlflow.create_run(experiment_id, run_name=ctx.run_name, tags={RUN_TAG: ctx.store.uri})
    params = _flatten(ctx.config.model_dump(mode="json"))
    for key, value in params.items():
        mlflow.log_param(run.info.run_id, key, value)
    return run.info.run_id


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def log_iteration(ctx: RunContext, iteration: int, metrics: dict[str, float], tags: dict[str, str] | None = None,
                  ) -> None:
    """Metrics of one iteration, step = iteration number; tags (e.g. Parquet URIs) on the run."""
    mlflow = client(ctx)
    run_id = training_run_id(ctx)
    for key, value in metrics.items():
        mlflow.log_metric(run_id, key, float(value), step=iteration)
    for key, value in (tags or {}).items():
        mlflow.set_tag(run_id, key, value)


def register_checkpoint(ctx: RunContext, source_uri: str, iteration: int) -> str:
    """Register the checkpoint directory as a new model version and point the `candidate` alias at it."""
    mlflow = client(ctx)
    name = ctx.config.publish.model_name
    try:
        mlflow.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = mlflow.create_model_version(
        name, source=source_uri, run_id=training_run_id(ctx),
        tags={RUN_TAG: ctx.store.uri, "iteration": str(iteration)})
    mlflow.set_registered_model_alias(name, CANDIDATE, version.version)
    return str(version.version)


def gate_champion(ctx: RunContext, version: str, success_rate: float) -> bool:
    """Record the version's held-out success and move `champion` to it unless it is worse than the champion."""
    mlflow = client(ctx)
    name = ctx.config.publish.model_name
    mlflow.set_model_version_tag(name, version, SUCCESS_TAG, f"{success_rate:.6f}")
    try:
        champion = mlflow.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None and champion.version != version:
        best = float(champion.tags.get(SUCCESS_TAG, "-inf"))
        if success_rate < best + ctx.config.evaluate.min_improvement:
            return False
    mlflow.set_registered_model_alias(name, CHAMPION, version)
    return True
