"""What every stage needs to run: the run's storage, its resolved config, and a local cache.

A run is created once (`create_run`), which freezes its resolved config into `<run>/run.json`; from then on every
stage, in any process or container, reopens the run from its URI alone (`open_run`), so a rerun of one stage of
an old iteration uses exactly the config that iteration was trained with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dypo import code_version
from dypo.stages.commit import CommittedStage, require_committed
from dypo.stages.config import Config, ConfigError, parse_config
from dypo.stages.environments import Status
from dypo.stages.environments.families import family_availability, get_family
from dypo.stages.storage import RunStore

RUN_FILE = "run.json"


def cache_dir() -> Path:
    """Local scratch space (checkpoint downloads, DeepSpeed's JIT-built ops); DYPO_CACHE_DIR overrides."""
    path = Path(os.environ.get("DYPO_CACHE_DIR", Path.cwd() / ".cache")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class RunContext:
    store: RunStore
    config: Config

    @property
    def run_name(self) -> str:
        return self.config.run.name

    @property
    def cache(self) -> Path:
        return cache_dir()

    def checkpoint(self, iteration: int) -> tuple[CommittedStage, str]:
        """The committed stage holding the policy after `iteration` and the checkpoint's key in the store.

        Iteration 0 is the warm-started policy; iteration k >= 1 is what the k-th optimize stage produced.
        """
        stage = "warmstart" if iteration == 0 else "optimize"
        committed = require_committed(self.store, stage, iteration)
        return committed, f"{committed.directory}/checkpoint"

    def local_copy(self, committed: CommittedStage, name: str) -> Path:
        """A local directory with the output directory `name` of a committed stage (downloaded once from S3)."""
        return self.store.local_dir(f"{committed.directory}/{name}", self.cache / "downloads", committed.sha256)

    def checkpoint_dir(self, iteration: int) -> Path:
        """A local directory with the policy after `iteration`."""
        committed, _ = self.checkpoint(iteration)
        return self.local_copy(committed, "checkpoint")


def default_mlflow_uri() -> str:
    """The embedded default: one SQLite database for all local runs, next to the cache."""
    state = Path(os.environ.get("DYPO_STATE_DIR", Path.cwd() / ".dypo")).resolve()
    state.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state}/mlflow.db"


def resolve_config(config: Config) -> Config:
    """Fill what the config leaves to the environment, so run.json holds everything a stage needs."""
    mlflow_uri = config.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri()
    prompt = config.env.system_prompt or get_family(config.env).default_system_prompt  # recorded with the run
    return config.model_copy(update={"tracking": config.tracking.model_copy(update={"mlflow_uri": mlflow_uri}),
                                     "env": config.env.model_copy(update={"system_prompt": prompt})})


def check_task_budget(config: Config) -> None:
    """Refuse a config whose env family cannot run here, or whose run would run out of fresh games part-way,
    before anything is trained."""
    found = family_availability(config.env.family, config.env)
    if found.status != Status.AVAILABLE:
        fix = f"; to enable it: {found.enable}" if found.enable else ""
        raise ConfigError(f"env.family {config.env.family} is not usable here ({found.status}): {found.detail}{fix}")
    try:
        family = get_family(config.env)
    except ValueError as error:
        raise ConfigError(f"invalid env section: {error}") from None
    draws = config.run.iterations * (1 + config.filter.max_extra_draws) * config.rollout.groups
    needed, available = config.warmstart.expert_tasks + draws, family.task_count("train")
    if needed > available:
        raise ConfigError(
            f"the run may need {needed} training games (warmstart.expert_tasks={config.warmstart.expert_tasks} + "
            f"run.iterations x (1 + filter.max_extra_draws) x rollout.groups = {draws}) but {config.env.family} "
            f"has {available}; lower one of these")
    if config.evaluate.tasks > family.task_count("heldout"):
        raise ConfigError(f"evaluate.tasks={config.evaluate.tasks} exceeds the {family.task_count('heldout')} "
                          f"held-out games of {config.env.family}")


def create_run(run_uri: str, config: Config) -> RunContext:
    """Start a run, or reopen it when it was started with the same config (resume)."""
    check_task_budget(config)
    store = RunStore(run_uri)
    config = resolve_config(config)
    if store.exists(RUN_FILE):
        existing = parse_config(store.read_json(RUN_FILE)["config"], store.uri_of(RUN_FILE))
        if existing != config:
            changed = [name for name in Config.model_fields if getattr(existing, name) != getattr(config, name)]
            raise ConfigError(
                f"run {store.uri} was started with a different config (sections differ: {', '.join(changed)}). "
                "Resume it with its own config (see `dypo config show --run URI`) or start a new run with --run")
        return RunContext(store, existing)
    store.write_json(RUN_FILE, {
        "config": config.model_dump(mode="json"),
        "code_version": code_version(),
        "created_at": datetime.now(UTC).isoformat(),
    })
    return RunContext(store, config)


def open_run(run_uri: str) -> RunContext:
    store = RunStore(run_uri)
    if not store.exists(RUN_FILE):
        raise ConfigError(f"{store.uri} is not a dypo run (no {RUN_FILE}); start one with "
                          "`dypo train --config CONFIG --run URI`")
    return RunContext(store, parse_config(store.read_json(RUN_FILE)["config"], store.uri_of(RUN_FILE)))
