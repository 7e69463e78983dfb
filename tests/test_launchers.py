"""Stage launchers and shards: a rollout played as 2 shard jobs equals the one-job rollout and commits only once
both are in; the container and deployment launchers explain what they are missing. (Their end-to-end runs, in
podman containers and through a real Prefect server and worker, are not on main yet: see the issue notes.)

"Matches" means the runs wrote the same data: every table of every stage (turns with their token ids and texts,
episodes, the filter's batch, training and evaluation metrics; only measured latencies differ) and bit-identical
checkpoints. On CPU the pipeline is deterministic given its seeds, and shards split a stage at generation-batch
boundaries (each batch has its own seeded generator), so any difference is a bug, not noise.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from test_pipeline import MICRO
from typer.testing import CliRunner

from dypo.cli import app
from dypo.flows.launchers import ContainerLauncher, DeploymentLauncher, LaunchError, StageJob
from dypo.schemas.tables import EPISODES, TURNS
from dypo.stages.commit import StageNotComplete, read_committed, read_stage_table
from dypo.stages.config import (
    Config,
    ConfigError,
    ContainerLaunchConfig,
    DeploymentLaunchConfig,
    parse_config,
)
from dypo.stages.context import create_run, open_run
from dypo.stages.registry import run_stage
from dypo.stages.shards import Shard

PROJECT = Path(__file__).resolve().parents[1]
# The micro config with batches of one group (rollout) and of two tasks (evaluate), so both split into 2 shards.
SHARDABLE = {**MICRO, "rollout": {**MICRO["rollout"], "batch_episodes": 3},
             "evaluate": {**MICRO["evaluate"], "batch_episodes": 2}}


def micro(tmp: Path, launch: dict | None = None) -> Config:
    return parse_config({**SHARDABLE, "tracking": {"mlflow_uri": f"sqlite:///{tmp}/mlflow.db"},
                         "launch": launch or {}})


@contextmanager
def environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_shard_parsing_and_batch_split():
    assert Shard.parse(" 1/4 ") == Shard(1, 4) and str(Shard(1, 4)) == "1/4"
    for text in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="i/N"):
            Shard.parse(text)
    for total in range(1, 9):
        for count in range(1, total + 1):
            ranges = [Shard(i, count).batches(total) for i in range(count)]
            assert [b for r in ranges for b in r] == list(range(total)) and all(len(r) for r in ranges)
    assert Shard(2, 3).part("turns.parquet") == "turns/part-00002.parquet"
    with pytest.raises(ValueError, match="tables only"):
        Shard(0, 2).part("checkpoint")


def test_configured_shards_must_fit_the_batches():
    with pytest.raises(ConfigError, match=r"3 rollout shards, but rollout plays 6 episodes .* 2 batch"):
        parse_config({**SHARDABLE, "launch": {"shards": {"rollout": 3}}})
    with pytest.raises(ConfigError, match=r"rollout\.batch_episodes=6 must be a multiple of rollout\.group_size=4"):
        parse_config({**SHARDABLE, "rollout": {**SHARDABLE["rollout"], "group_size": 4, "batch_episodes": 6},
                      "launch": {"shards": {"rollout": 2}}})
    with pytest.raises(ConfigError, match="3 evaluate shards"):
        parse_config({**SHARDABLE, "launch": {"shards": {"evaluate": 3}}})
    with pytest.raises(ConfigError, match=re.escape("may only use {stage} and {family}")):
        parse_config({"launch": {"deployment": {"name": "dypo/{stage}-{pool}"}}})


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory) -> str:
    """A local micro run with its warm-started policy (iteration 0), to play rollouts from."""
    tmp = tmp_path_factory.mktemp("shards")
    with environment(DYPO_CACHE_DIR=str(tmp / "cache")):
        ctx = create_run(str(tmp / "run"), micro(tmp))
        run_stage(ctx.store.uri, "warmstart", 0)
    return ctx.store.uri


def _played(run_uri: str, stage: str = "rollout") -> dict[str, list[dict]]:
    store = open_run(run_uri).store
    return {name: read_stage_table(store, f"iter-000001/{stage}", name, spec).drop_columns(
        [c for c in ("latency_s",) if c in spec.schema.names]).to_pylist()
        for name, spec in (("turns.parquet", TURNS), ("episodes.parquet", EPISODES))}


@pytest.mark.slow
def test_two_rollout_shards_play_the_one_job_rollout_and_commit_only_together(warm_run):
    store = open_run(warm_run).store
    whole = run_stage(warm_run, "rollout", 1)
    one_job = _played(warm_run)

    first = run_stage(warm_run, "rollout", 1, shard=Shard(0, 2), force=True)
    assert first.details["shard"] == "0/2"
    assert read_committed(store, "rollout", 1) is None, "one shard of two must leave the stage uncommitted"
    with pytest.raises(StageNotComplete, match="stage 'rollout' of iteration 1 has not committed"):
        run_stage(warm_run, "filter", 1)
    run_stage(warm_run, "rollout", 1, shard=Shard(1, 2))

    committed = read_committed(store, "rollout", 1)
    assert committed is not None and committed.manifest.details["shards"] == "2"
    assert sorted(o.path for o in committed.manifest.outputs) == [
        "episodes/part-00000.parquet", "episodes/part-00001.parquet", "turns/part-00000.parquet",
        "turns/part-00001.parquet"]
    assert _played(warm_run) == one_job
    timing = {"play_seconds", "generated_tokens_per_s"}
    assert {k: v for k, v in committed.manifest.metrics.items() if k not in timing} == {
        k: v for k, v in whole.metrics.items() if k not in timing}
    parts = [store.read_table(f"iter-000001/rollout/episodes/part-0000{i}.parquet", EPISODES) for i in (0, 1)]
    groups = [set(part.column("group_id").to_pylist()) for part in parts]
    assert all(groups) and groups[0].isdisjoint(groups[1]), "each group must stay within one shard"
    batch = run_stage(warm_run, "filter", 1)
    assert batch.metrics["drawn_groups"] == 2


@pytest.mark.slow
def test_concluding_a_sharded_stage_twice_writes_the_same_manifest(warm_run):
    """Two shards finishing together both conclude: they must write the very same bytes. Rerunning a shard whose
    part is already in also finishes a stage whose concluding shard died before its stage manifest."""
    store = open_run(warm_run).store
    run_stage(warm_run, "rollout", 1, shard=Shard(0, 2))
    run_stage(warm_run, "rollout", 1, shard=Shard(1, 2))
    key = "iter-000001/rollout/manifest.json"
    concluded = store.read_bytes(key)
    store.fs.delete_file(store.path(key))
    again = run_stage(warm_run, "rollout", 1, shard=Shard(1, 2))
    assert not again.skipped and "shard" not in again.details
    assert store.read_bytes(key) == concluded


@pytest.mark.slow
def test_shards_played_with_other_inputs_do_not_commit_together(warm_run, monkeypatch):
    """Shards from images of different builds have different input digests (the code version is an input), so the
    stage waits until all its shards are replayed with one build."""
    store = open_run(warm_run).store
    run_stage(warm_run, "rollout", 1, shard=Shard(0, 2))
    monkeypatch.setenv("DYPO_CODE_VERSION", "0.1.0+another-build")
    run_stage(warm_run, "rollout", 1, shard=Shard(1, 2), force=True)
    monkeypatch.delenv("DYPO_CODE_VERSION")
    again = run_stage(warm_run, "rollout", 1, shard=Shard(0, 2))
    assert again.skipped and read_committed(store, "rollout", 1) is None
    replayed = run_stage(warm_run, "rollout", 1, shard=Shard(1, 2))
    assert not replayed.skipped and read_committed(store, "rollout", 1) is not None


def test_cli_refuses_shards_of_single_job_stages_and_malformed_shards(tmp_path):
    ctx = create_run(str(tmp_path / "run"), micro(tmp_path))
    runner = CliRunner()
    result = runner.invoke(app, ["stage", "filter", "--run", ctx.store.uri, "--iter", "1", "--shard", "0/2"])
    assert result.exit_code == 2 and "only rollout and evaluate run in shards" in result.output
    result = runner.invoke(app, ["stage", "rollout", "--run", ctx.store.uri, "--iter", "1", "--shard", "2/2"])
    assert result.exit_code == 2 and "shard 2/2 does not exist" in result.output
    result = runner.invoke(app, ["stage", "rollout", "--run", ctx.store.uri, "--iter", "1", "--shard", "0/3"])
    assert result.exit_code == 2 and "use at most 2 shards" in result.output


# --- the container launcher -----------------------------------------------------------------------------------


def test_container_launcher_without_its_engine_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    launcher = ContainerLauncher(ContainerLaunchConfig(), str(tmp_path / "run"), None)
    with pytest.raises(LaunchError, match="needs podman, which is not on PATH: install it"):
        launcher.run(StageJob(str(tmp_path / "run"), "filter", 1))


def test_deployment_launcher_needs_a_prefect_server(tmp_path):
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(LaunchError, match="PREFECT_API_URL"):
        DeploymentLauncher(DeploymentLaunchConfig()).run(StageJob(str(tmp_path), "filter", 1))
