"""How the training flow runs one stage job: in this process, in its own container, or as a Prefect deployment.

Every launcher runs the same thing, `dypo stage NAME --run URI --iter I [--draw D] [--shard i/N]`, and returns
once the job has ended, raising `LaunchError` if it failed. A job reports through the run's storage, not through
the launcher: what a stage produced is its manifest. So the flow is the same code for every launcher, and
switching launchers (config `launch.launcher`) changes where stages run, never what they write.

- `local` (the embedded default) calls the stage in this process.
- `container` runs each job with podman or docker on this machine, on the host network (so a loopback S3 or MLflow
  server is reachable), with the run's storage and MLflow settings passed in and local paths mounted in place.
- `deployment` starts the stage's Prefect deployment (`flows/stage.py:run_one_stage`, one per stage in
  flows/prefect.yaml: on Kubernetes, its own job, image and GPUs) and waits for its flow run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from dypo.stages.config import ContainerLaunchConfig, DeploymentLaunchConfig, LaunchConfig
from dypo.stages.context import cache_dir
from dypo.stages.storage import RunStore

# The image family each stage runs in (images/README.md); `launch.container.images` names the images.
STAGE_FAMILIES = {"warmstart": "train_gpu", "rollout": "rollout_gpu", "filter": "cpu", "optimize": "train_gpu",
                  "publish": "cpu", "evaluate": "rollout_gpu"}
# Always handed to containers when set here: object-storage credentials and endpoints, MLflow's client settings.
PASSED_ENV_PREFIXES = ("AWS_", "MLFLOW_")


class LaunchError(RuntimeError):
    """A stage job could not start or did not succeed; the message names the job and where to look."""


@dataclass(frozen=True)
class StageJob:
    """One job of one stage: what `dypo stage` runs, and the parameters of the stage's deployment."""

    run_uri: str
    stage: str
    iteration: int
    draw: int = 0
    shard: str | None = None  # "i/N" for one shard of rollout or evaluate
    force: bool = False

    @property
    def label(self) -> str:
        draw = f"-draw{self.draw}" if self.draw else ""
        shard = f"-shard{self.shard.replace('/', 'of')}" if self.shard else ""
        return f"{self.stage}-iter{self.iteration}{draw}{shard}"

    def stage_args(self) -> list[str]:
        """The arguments of `dypo stage` for this job."""
        args = [self.stage, "--run", self.run_uri, "--iter", str(self.iteration)]
        if self.draw:
            args += ["--draw", str(self.draw)]
        if self.shard:
            args += ["--shard", self.shard]
        if self.force:
            args.append("--force")
        return args

    def parameters(self) -> dict[str, object]:
        """The parameters of `run_one_stage`, the flow every stage deployment runs."""
        return {"run_uri": self.run_uri, "stage": self.stage, "iteration": self.iteration, "draw": self.draw,
                "shard": self.shard, "force": self.force}


class Launcher(Protocol):
    parallel: bool  # whether the flow may run this launcher's jobs (a stage's shards) at the same time

    def run(self, job: StageJob) -> None:
        """Run the job to its end; raise LaunchError if it failed."""


class LocalLauncher:
    """In this process, one job at a time."""

    parallel = False

    def run(self, job: StageJob) -> None:
        from dypo.stages.registry import run_stage
        from dypo.stages.shards import Shard

        run_stage(job.run_uri, job.stage, job.iteration, draw=job.draw, force=job.force,
                  shard=Shard.parse(job.shard) if job.shard else None)


def _tracking_path(uri: str) -> Path | None:
    """The local directory holding an MLflow store (a SQLite database's, or a file store), to mount in place."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":  # sqlite:///relative.db or sqlite:////absolute.db; SQLite adds files beside it
        return Path(uri.removeprefix("sqlite:///")).resolve().parent
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" and Path(uri).exists():
        return Path(uri).resolve()
    return None  # a tracking server, reached over the host network


class ContainerLauncher:
    """Each job in its own container on this machine (podman or docker), the images' entrypoint `dypo stage`.

    Containers share the host's network, so storage and MLflow servers on 127.0.0.1 work as on the host.
    Local paths the job needs (a local run directory, a SQLite MLflow store) are mounted at the same path, and
    a per-image cache directory (checkpoint downloads, DeepSpeed's compiled ops) persists across jobs. Jobs run
    as the calling user, so files they write into mounted directories belong to that user (rootless podman gets
    `--userns=keep-id` for that).
    """

    parallel = True

    def __init__(self, config: ContainerLaunchConfig, run_uri: str, tracking_uri: str | None) -> None:
        self.config = config
        store = RunStore(run_uri)
        self.mounts = [Path(store.root)] if store.is_local else []
        tracking_path = _tracking_path(tracking_uri) if tracking_uri else None
        if tracking_path is not None:
            self.mounts.append(tracking_path)
        self.tracking_uri = tracking_uri

    def image(self, stage: str) -> str:
        return getattr(self.config.images, STAGE_FAMILIES[stage])

    def _image_id(self, stage: str) -> str:
        engine, image = self.config.engine, self.image(stage)
        if shutil.which(engine) is None:
            raise LaunchError(f"the container launcher needs {engine}, which is not on PATH: install it (Debian: "
                              f"apt-get install {engine}) or set launch.container.engine")
        found = subprocess.run([engine, "image", "inspect", "--format", "{{.Id}}", image], capture_output=True,
                               text=True)
        if found.returncode != 0:
            family = STAGE_FAMILIES[stage]
            raise LaunchError(
                f"{engine} has no image {image!r} for stage {stage} ({found.stderr.strip()}); build it from the "
                f"repository root (`{engine} build -f images/{family.replace('_', '-')}/Dockerfile -t {image} .`) "
                f"or name another one in launch.container.images.{family}")
        return found.stdout.strip().removeprefix("sha256:")

    def command(self, job: StageJob) -> list[str]:
        cache = cache_dir() / "containers" / self._image_id(job.stage)[:16]
        (cache / "home").mkdir(parents=True, exist_ok=True)
        inside = {"DYPO_CACHE_DIR": cache, "TORCH_EXTENSIONS_DIR": cache / "torch_extensions", "HOME": cache / "home",
                  "XDG_CACHE_HOME": cache / "home" / ".cache"}
        command = [self.config.engine, "run", "--rm", "--network=host", f"--user={os.getuid()}:{os.getgid()}"]
        if self.config.engine == "podman" and os.getuid() != 0:
            command.append("--userns=keep-id")
        for path in [*self.mounts, cache]:
            command += ["--volume", f"{path}:{path}"]
        for name, value in inside.items():
            command += ["--env", f"{name}={value}"]
        # `--env NAME` takes the value from this process, so secrets never appear in the command line.
        command += [arg for name in self._passed_env() for arg in ("--env", name)]
        return [*command, *self.config.extra_args, self.image(job.stage), *job.stage_args()]

    def _passed_env(self) -> list[str]:
        names = {name for name in os.environ if name.startswith(PASSED_ENV_PREFIXES)}
        names |= {name for name in self.config.pass_env if name in os.environ}
        if self.tracking_uri:
            names.add("MLFLOW_TRACKING_URI")
        return sorted(names)

    def run(self, job: StageJob) -> None:
        command = self.command(job)
        env = dict(os.environ)
        if self.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        done = subprocess.run(command, env=env)
        if done.returncode != 0:
            raise LaunchError(f"stage job {job.label} failed in container {self.image(job.stage)} (exit code "
                              f"{done.returncode}); its output is above. Command: {' '.join(command)}")


class DeploymentLauncher:
    """Each job as a flow run of the stage's Prefect deployment, picked up by a worker (on Kubernetes: a job)."""

    parallel = True

    def __init__(self, config: DeploymentLaunchConfig) -> None:
        self.config = config

    def deployment(self, stage: str) -> str:
        return self.config.name.format(stage=stage, family=STAGE_FAMILIES[stage])

    def run(self, job: StageJob) -> None:
        from prefect.deployments import run_deployment
        from prefect.exceptions import ObjectNotFound
        from prefect.settings import PREFECT_API_URL

        api = PREFECT_API_URL.value()
        if not api:
            raise LaunchError("the deployment launcher needs a Prefect server: set PREFECT_API_URL (e.g. "
                              "http://127.0.0.1:4200/api) to the server the stage deployments live on")
        name = self.deployment(job.stage)
        try:
            flow_run = run_deployment(name, parameters=job.parameters(), timeout=self.config.timeout_s,
                                      poll_interval=2, flow_run_name=job.label)
        except ObjectNotFound:
            raise LaunchError(f"no deployment {name!r} on the Prefect server {api}: deploy the stage flows ("
                              "`prefect deploy --all` with flows/prefect.yaml) or set launch.deployment.name") from None
        state = flow_run.state
        if state is None or not state.is_completed():
            ended = f"is {state.name}" if state is not None else "has no state"
            waited = f" after {self.config.timeout_s:g} s" if self.config.timeout_s else ""
            raise LaunchError(f"stage job {job.label}: flow run {flow_run.name!r} of deployment {name!r} {ended}"
                              f"{waited}: {state.message if state is not None else ''} (see it on {api})")


def launcher_for(config: LaunchConfig, run_uri: str, tracking_uri: str | None) -> Launcher:
    if config.launcher == "container":
        return ContainerLauncher(config.container, run_uri, tracking_uri)
    if config.launcher == "deployment":
        return DeploymentLauncher(config.deployment)
    return LocalLauncher()
