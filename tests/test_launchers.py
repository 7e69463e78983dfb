"""Stage launchers and shards end to end, each compared with the in-process (`local`) launcher's run.

- shards: a rollout played as 2 shard jobs equals the one-job rollout, and commits only once both are in;
- `container`: every stage job in its own podman container of the `dypo-cpu` image (built here from a base made
  with debootstrap), against the loopback S3 server;
- `deployment`: every stage job a flow run of its Prefect deployment on a real `prefect server` on 127.0.0.1,
  executed by a real `process` worker standing in for Kubernetes.

"Matches" means the runs wrote the same data: every table of every stage (turns with their token ids and texts,
episodes, the filter's batch, training and evaluation metrics; only measured latencies differ) and bit-identical
checkpoints. On CPU the pipeline is deterministic given its seeds, and shards split a stage at generation-batch
boundaries (each batch has its own seeded generator), so any difference is a bug, not noise.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
import torch
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings
from test_pipeline import MICRO
from typer.testing import CliRunner

from dypo.cli import app
from dypo.flows.launchers import ContainerLauncher, DeploymentLauncher, LaunchError, StageJob
from dypo.flows.stage import run_one_stage
from dypo.flows.train import train
from dypo.schemas.tables import BATCH, EPISODES, EVAL_METRICS, TRAIN_METRICS, TURNS, TableSpec
from dypo.stages.commit import StageNotComplete, read_committed, read_stage_table, table_parts
from dypo.stages.config import (
    Config,
    ConfigError,
    ContainerImages,
    ContainerLaunchConfig,
    DeploymentLaunchConfig,
    parse_config,
)
from dypo.stages.context import create_run, open_run
from dypo.stages.registry import STAGE_NAMES, run_stage
from dypo.stages.shards import Shard

PROJECT = Path(__file__).resolve().parents[1]
# Read before the per-test isolation replaces it: the podman storage (base image, build cache) lives here.
PROJECT_CACHE = Path(os.environ.get("DYPO_CACHE_DIR", PROJECT / ".cache")).resolve()
BIN = Path(sys.executable).parent
IMAGE = "localhost/dypo-cpu:test"
BASE_IMAGE = "localhost/dypo-test-base:bookworm"
BUCKET = "dypo-launchers"
# The micro config with batches of one group (rollout) and of two tasks (evaluate), so both split into 2 shards.
SHARDABLE = {**MICRO, "rollout": {**MICRO["rollout"], "batch_episodes": 3},
             "evaluate": {**MICRO["evaluate"], "batch_episodes": 2}}
TWO_SHARDS = {"rollout": 2, "evaluate": 2}
TABLES = {"turns.parquet": TURNS, "episodes.parquet": EPISODES, "batch.parquet": BATCH}
STAGES = [(0, "warmstart"), (0, "publish"), (0, "evaluate"), (1, "rollout"), (1, "rollout-aux-01"), (1, "filter"),
          (1, "optimize"), (1, "publish"), (1, "evaluate")]
# The jobs of one micro run with two shards: filter runs after each of the two rollout draws.
JOBS = Counter({"warmstart-iter0": 1, "publish-iter0": 1, "evaluate-iter0-shard0of2": 1,
                "evaluate-iter0-shard1of2": 1, "rollout-iter1-shard0of2": 1, "rollout-iter1-shard1of2": 1,
                "rollout-iter1-draw1-shard0of2": 1, "rollout-iter1-draw1-shard1of2": 1, "filter-iter1": 2,
                "optimize-iter1": 1, "publish-iter1": 1, "evaluate-iter1-shard0of2": 1,
                "evaluate-iter1-shard1of2": 1})


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


def _spec(stage: str, name: str) -> TableSpec:
    if name == "metrics.parquet":
        return EVAL_METRICS if stage == "evaluate" else TRAIN_METRICS
    return TABLES[name]


def contents(run_uri: str) -> dict:
    """What a run wrote, whichever launcher and sharding wrote it: every table of every stage (without measured
    latencies), the checksums of every checkpoint and optimizer file, and the champion decisions."""
    store = open_run(run_uri).store
    found: dict = {}
    for iteration, stage in STAGES:
        committed = read_committed(store, stage, iteration)
        assert committed is not None, f"{stage} of iteration {iteration} did not commit in {run_uri}"
        manifest = committed.manifest
        for output in manifest.outputs:
            if output.path.startswith(("checkpoint/", "optimizer/")):
                found[(iteration, stage, output.path)] = output.sha256
        for name in ("turns.parquet", "episodes.parquet", "batch.parquet", "metrics.parquet"):
            if table_parts(manifest.outputs, name):
                table = read_stage_table(store, committed.directory, name, _spec(stage, name))
                found[(iteration, stage, name)] = table.drop_columns(
                    [c for c in ("latency_s",) if c in table.column_names]).to_pylist()
        if stage == "evaluate":
            found[(iteration, stage, "champion_moved")] = manifest.details["champion_moved"]
    return found


# --- shards ---------------------------------------------------------------------------------------------------


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


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, s3_endpoint, prefect_harness) -> str:
    """The micro config trained by the `local` launcher, one job per stage, with its run on the loopback S3 server:
    what the other launchers must reproduce."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    tmp = tmp_path_factory.mktemp("local")
    with environment(DYPO_CACHE_DIR=str(tmp / "cache")):
        ctx = create_run(f"s3://{BUCKET}/local", micro(tmp))
        train(ctx.store.uri)
    return ctx.store.uri


def test_container_launcher_without_its_engine_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    launcher = ContainerLauncher(ContainerLaunchConfig(), str(tmp_path / "run"), None)
    with pytest.raises(LaunchError, match="needs podman, which is not on PATH: install it"):
        launcher.run(StageJob(str(tmp_path / "run"), "filter", 1))


def _debian_mirror() -> str:
    """The Debian archive this machine's apt uses (debootstrap needs it; no image registry is reachable)."""
    sources = Path("/etc/apt/sources.list.d")
    for stanza in "\n".join(p.read_text() for p in sorted(sources.glob("*.sources"))).split("\n\n"):
        fields = dict(line.split(":", 1) for line in stanza.splitlines() if ":" in line and line[0] != "#")
        if "bookworm" in fields.get("Suites", "").split() and fields.get("URIs"):
            return fields["URIs"].split()[0]
    listed = Path("/etc/apt/sources.list")
    for line in listed.read_text().splitlines() if listed.exists() else []:
        words = line.split()
        if words[:1] == ["deb"] and "bookworm" in words:
            return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def _pip_setting(name: str) -> str | None:
    """A setting of this machine's pip (environment first, then its config files)."""
    value = os.environ.get(f"PIP_{name.upper().replace('-', '_')}")
    if value:
        return value
    found = subprocess.run([sys.executable, "-m", "pip", "config", "get", f"global.{name}"], capture_output=True,
                           text=True)
    return found.stdout.strip() or None if found.returncode == 0 else None


def _podman(*args: str, log: Path | None = None) -> subprocess.CompletedProcess:
    if log is None:
        return subprocess.run(["podman", *args], capture_output=True, text=True)
    with log.open("w") as out:
        done = subprocess.run(["podman", *args], stdout=out, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        pytest.fail(f"podman {args[0]} failed (exit {done.returncode}); last lines of {log}:\n"
                    + "\n".join(log.read_text().splitlines()[-30:]))
    return done


def _make_base_image(root: Path) -> None:
    """Debian bookworm from this machine's mirror, imported as an image (kept in the cached podman storage)."""
    if _podman("image", "exists", BASE_IMAGE).returncode == 0:
        return
    if shutil.which("debootstrap") is None:
        pytest.fail("podman is here but debootstrap is not: apt-get install debootstrap (.ci/run does)")
    rootfs = root / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    made = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), _debian_mirror()],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.fail(f"debootstrap failed: {made.stderr[-2000:]}")
    with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
        imported = subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True)
    shutil.rmtree(rootfs)
    if imported.returncode != 0:
        pytest.fail(f"podman import failed: {imported.stderr.decode()[-2000:]}")


def _build_args(root: Path) -> list[str]:
    """Build the image with this machine's pip setup: its CPU torch wheel and its CA bundle (pip may sit behind a
    TLS-inspecting proxy), mounted into the build through the Dockerfile's PIP_FIND_LINKS and PIP_CERT."""
    args = ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
    wheels = root / "wheels"
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", f"torch=={torch.__version__}", "--no-deps",
                              "--dest", str(wheels)], capture_output=True, text=True)
    if fetched.returncode == 0:  # else the Dockerfile's default: the PyTorch CPU index
        args += ["--volume", f"{wheels}:/build/wheels:ro", "--build-arg", "PIP_FIND_LINKS=/build/wheels",
                 "--build-arg", f"TORCH_SPEC=torch=={torch.__version__}",
                 "--build-arg", f"TORCH_INDEX_URL={_pip_setting('index-url') or 'https://pypi.org/simple'}"]
    cert = _pip_setting("cert")
    if cert and Path(cert).is_file():
        args += ["--volume", f"{cert}:/build/ca.crt:ro", "--build-arg", "PIP_CERT=/build/ca.crt"]
    return args


@pytest.fixture(scope="module")
def podman_image() -> Iterator[str]:
    """The dypo-cpu image, built with podman from a debootstrap base; the storage (base image and build cache)
    persists under the project cache, so a rerun rebuilds only the layers whose sources changed."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: apt-get install podman buildah runc debootstrap (.ci/run installs them)")
    root = PROJECT_CACHE / "podman"
    root.mkdir(parents=True, exist_ok=True)
    # This machine's settings (PLATFORM.md): runc, cgroupfs, file events, ulimits podman may set; overlay storage.
    (root / "containers.conf").write_text(
        '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        f'events_logfile_path = "{root}/events.log"\n')
    (root / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/storage"\nrunroot = "{root}/run"\n')
    with environment(CONTAINERS_CONF=str(root / "containers.conf"),
                     CONTAINERS_STORAGE_CONF=str(root / "storage.conf")):
        _make_base_image(root)
        _podman("build", "--network=host", "--file", "images/cpu/Dockerfile", "--tag", IMAGE, *_build_args(root),
                str(PROJECT), log=root / "build-cpu.log")
        yield IMAGE


def _container_starts(since: float) -> Counter:
    events = _podman("events", "--stream=false", "--since", str(int(since)), "--filter", "event=start",
                     "--format", "{{.Image}}")
    return Counter(events.stdout.split())


@pytest.mark.slow
def test_container_launcher_runs_every_stage_in_its_own_container_and_matches_local(
        podman_image, reference_run, tmp_path):
    images = {"cpu": podman_image, "rollout_gpu": podman_image, "train_gpu": podman_image}
    config = micro(tmp_path, {"launcher": "container", "shards": TWO_SHARDS, "container": {"images": images}})
    started = time.time() - 1
    with environment(DYPO_CACHE_DIR=str(tmp_path / "cache")):
        ctx = create_run(f"s3://{BUCKET}/container", config)
        evaluations = train(ctx.store.uri)
    assert [e.iteration for e in evaluations] == [0, 1]
    assert _container_starts(started)[podman_image] == sum(JOBS.values())
    assert contents(ctx.store.uri) == contents(reference_run)
    rollout = read_committed(ctx.store, "rollout", 1).manifest
    assert "turns/part-00001.parquet" in [o.path for o in rollout.outputs]
    # the stages in their containers logged into the host's MLflow database (mounted in place)
    client = MlflowClient(config.tracking.mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("dypo").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "evaluate/success_rate")) == [0, 1]


@pytest.mark.slow
def test_container_launcher_mounts_local_paths_passes_secrets_by_name_and_reports_failures(
        podman_image, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "s3cr3t-session-token")
    ctx = create_run(str(tmp_path / "run"), micro(tmp_path))
    images = ContainerImages(cpu=podman_image, rollout_gpu=podman_image, train_gpu=podman_image)
    launcher = ContainerLauncher(ContainerLaunchConfig(images=images, pass_env=["HF_HUB_OFFLINE"]), ctx.store.uri,
                                 ctx.config.tracking.mlflow_uri)
    command = launcher.command(StageJob(ctx.store.uri, "optimize", 7))
    assert "--network=host" in command and "s3cr3t-session-token" not in " ".join(command)
    for name in ("AWS_SESSION_TOKEN", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE"):
        assert command[command.index(name) - 1] == "--env"
    for mounted in (tmp_path / "run", tmp_path):  # the run directory and the SQLite MLflow store's directory
        assert command[command.index(f"{mounted}:{mounted}") - 1] == "--volume"
    # the container reads the mounted run and refuses the stage: iteration 7 has no inputs
    with pytest.raises(LaunchError, match=r"stage job optimize-iter7 failed in container .* \(exit code 2\)"):
        launcher.run(StageJob(ctx.store.uri, "optimize", 7))
    missing = ContainerLauncher(ContainerLaunchConfig(images=ContainerImages(cpu="localhost/dypo-nowhere:1")),
                                ctx.store.uri, None)
    with pytest.raises(LaunchError, match=r"no image 'localhost/dypo-nowhere:1' .* images/cpu/Dockerfile"):
        missing.run(StageJob(ctx.store.uri, "filter", 1))


# --- the deployment launcher ----------------------------------------------------------------------------------

POOL = "dypo-test-pool"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prefect_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


@contextmanager
def _process(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def prefect_worker(tmp_path_factory, s3_endpoint) -> Iterator[str]:
    """A real Prefect server on 127.0.0.1, the six stage deployments of `run_one_stage` on a `process` work pool,
    and a real worker executing their flow runs as subprocesses; yields the API URL."""
    tmp = tmp_path_factory.mktemp("prefect")
    api = f"http://127.0.0.1:{_free_port()}/api"
    port = api.split(":")[-1].split("/")[0]
    server = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port]
    with _process(server, _prefect_env(tmp / "server"), tmp / "server.log") as process:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"prefect server did not come up: {(tmp / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        client_env = _prefect_env(tmp / "client", PREFECT_API_URL=api)
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], env=client_env,
                       check=True, capture_output=True)
        with temporary_settings(updates={PREFECT_API_URL: api}):
            for stage in STAGE_NAMES:
                run_one_stage.from_source(source=str(PROJECT), entrypoint="flows/stage.py:run_one_stage").deploy(
                    name=stage, work_pool_name=POOL, print_next_steps=False, ignore_warnings=True)
        worker_env = _prefect_env(tmp / "worker", PREFECT_API_URL=api, PREFECT_WORKER_QUERY_SECONDS="1",
                                  DYPO_CACHE_DIR=str(tmp / "worker-cache"), DYPO_STATE_DIR=str(tmp / "state"))
        worker = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--limit", "4"]
        with _process(worker, worker_env, tmp / "worker.log"):
            yield api


def test_deployment_launcher_needs_a_prefect_server(tmp_path):
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(LaunchError, match="PREFECT_API_URL"):
        DeploymentLauncher(DeploymentLaunchConfig()).run(StageJob(str(tmp_path), "filter", 1))


@pytest.mark.slow
def test_deployment_launcher_runs_every_stage_as_a_flow_run_of_its_deployment(
        prefect_worker, reference_run, tmp_path):
    config = micro(tmp_path, {"launcher": "deployment", "shards": TWO_SHARDS})
    with temporary_settings(updates={PREFECT_API_URL: prefect_worker}):
        ctx = create_run(f"s3://{BUCKET}/deployment", config)
        evaluations = train(ctx.store.uri)
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["dypo-stage"])))
    assert [e.iteration for e in evaluations] == [0, 1]
    assert Counter(run.name for run in runs) == JOBS
    assert all(run.state.is_completed() and run.deployment_id and run.parent_task_run_id for run in runs)
    assert contents(ctx.store.uri) == contents(reference_run)


@pytest.mark.slow
def test_deployment_launcher_reports_failed_runs_and_missing_deployments(prefect_worker, tmp_path):
    run_uri = create_run(str(tmp_path / "run"), micro(tmp_path)).store.uri
    with temporary_settings(updates={PREFECT_API_URL: prefect_worker}):
        with pytest.raises(LaunchError, match=r"flow run 'optimize-iter7' of deployment 'dypo-stage/optimize' is "
                                              r"Failed"):
            DeploymentLauncher(DeploymentLaunchConfig()).run(StageJob(run_uri, "optimize", 7))
        with pytest.raises(LaunchError, match="no deployment 'dypo-stage/nowhere-filter'"):
            DeploymentLauncher(DeploymentLaunchConfig(name="dypo-stage/nowhere-{stage}")).run(
                StageJob(run_uri, "filter", 1))
