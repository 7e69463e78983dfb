"""A real Prefect server on 127.0.0.1 takes dypo's Kubernetes work pool (k8s/prefect/base-job-template.json) and
every deployment of flows/prefect.yaml through the ordinary CLI (`prefect work-pool create`, `prefect deploy`); then
each deployment's flow run is rendered into the Job the Kubernetes worker would submit, and validated.

One server for the module (10-20 s to start); `prefect deploy` imports the flows (~20 s of torch/transformers
imports), and each rejected deploy is a CLI process of its own: about a minute in all, hence `slow`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.schema_tools import validate as validate_job_variables
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration
from test_k8s_manifests import (
    KUBERNETES_VERSIONS,
    PREFECT_YAML,
    ROOT,
    TEMPLATE,
    schema_errors,
    template,
    without_prefect_pod_spec_extras,
)

pytestmark = pytest.mark.slow

PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "dypo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME; yields the clients' environment."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLI_COLORS": "false"}
    log = (home / "server.log").open("w")
    process = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"prefect server did not become healthy:\n{(home / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield env
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def prefect(env: dict[str, str], *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=300)


def run(coroutine_function: Any, env: dict[str, str]) -> Any:
    async def with_client() -> Any:
        async with PrefectClient(api=env["PREFECT_API_URL"]) as client:
            return await coroutine_function(client)

    return asyncio.run(with_client())


@pytest.fixture(scope="module")
def work_pool(server: dict[str, str]) -> dict[str, str]:
    created = prefect(server, "work-pool", "create", POOL, "--type", "kubernetes",
                      "--base-job-template", str(TEMPLATE))
    assert created.returncode == 0, created.stdout + created.stderr
    return server


@pytest.fixture(scope="module")
def deployed(work_pool: dict[str, str]) -> dict[str, str]:
    result = prefect(work_pool, "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work_pool


def test_the_server_keeps_our_template(work_pool: dict[str, str]) -> None:
    pool = run(lambda client: client.read_work_pool(POOL), work_pool)
    assert pool.type == "kubernetes"
    assert pool.base_job_template == template()


def test_every_deployment_is_created_as_written(deployed: dict[str, str]) -> None:
    written = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    stored = run(lambda client: client.read_deployments(), deployed)
    assert {d.name for d in stored} == set(written)
    for deployment in stored:
        spec = written[deployment.name]
        assert deployment.entrypoint == spec["entrypoint"]
        assert deployment.work_pool_name == POOL
        assert deployment.job_variables == spec["work_pool"]["job_variables"]
        assert deployment.parameters == spec.get("parameters", {})
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/dypo/app"}}]


def test_each_flow_run_renders_the_job_the_worker_would_submit(deployed: dict[str, str]) -> None:
    """For every deployment: the server accepts a flow run (it enforces required job variables there), the job
    variables validate against the stored pool schema, and the worker's own renderer turns them into a valid Job."""

    async def render_all(client: PrefectClient) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
        pool = await client.read_work_pool(POOL)
        jobs = {}
        for deployment in await client.read_deployments():
            flow_run = await client.create_flow_run_from_deployment(
                deployment.id, parameters={"run_uri": "s3://dypo-runs/test", "iteration": 1})
            variables = {**deployment.job_variables, **(flow_run.job_variables or {})}
            errors = validate_job_variables(variables, pool.base_job_template["variables"], raise_on_error=False)
            assert not errors, f"{deployment.name}: {[error.message for error in errors]}"
            configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(
                pool.base_job_template, variables, client=client)
            flow = await client.read_flow(deployment.flow_id)
            configuration.prepare_for_flow_run(flow_run, deployment=deployment, flow=flow, work_pool=pool)
            jobs[deployment.name] = (variables, configuration.job_manifest)
        return jobs

    # The worker hands its own Prefect settings (the API URL above all) to every flow-run pod.
    with temporary_settings({PREFECT_API_URL: deployed["PREFECT_API_URL"]}):
        jobs = run(render_all, deployed)
    assert len(jobs) == 7
    for name, (variables, job) in jobs.items():
        for k8s_version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(job, k8s_version, strict=False)
        assert not schema_errors(without_prefect_pod_spec_extras(job)), name
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["image"] == variables["image"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == variables.get("gpu_count", 0)
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["PREFECT_API_URL"] == deployed["PREFECT_API_URL"]
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert labels["prefect.io/deployment-name"] == name and labels["dypo.io/workload"] == "stage"


@pytest.mark.parametrize(("variable", "value", "complaint"), [
    ("gpu_count", "two", "Validation failed for field 'gpu_count'"),
    ("gpu_cont", 1, "Additional properties are not allowed ('gpu_cont' was unexpected)"),
    ("memory_limit", "lots", "'lots' does not match"),
])
def test_the_server_rejects_a_bad_deployment(work_pool: dict[str, str], tmp_path: Path, variable: str,
                                             value: Any, complaint: str) -> None:
    """Wrong types, unknown names (Prefect accepts those silently unless the schema forbids them, as ours does) and
    malformed quantities never reach a worker. (A one-line flow keeps `prefect deploy` from importing dypo.)"""
    (tmp_path / "tiny.py").write_text("from prefect import flow\n\n\n@flow\ndef tiny() -> None:\n    pass\n")
    job_variables = {"image": "dypo-cpu:0.1.0", variable: value}
    bad = {"deployments": [{"name": "bad", "entrypoint": "tiny.py:tiny",
                            "work_pool": {"name": POOL, "job_variables": job_variables}}]}
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(bad))
    result = prefect(work_pool, "--no-prompt", "deploy", "--all", cwd=tmp_path)
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr
    assert "bad" not in {d.name for d in run(lambda client: client.read_deployments(), work_pool)}


def test_job_variable_overrides_for_a_cluster_without_gpus(work_pool: dict[str, str], tmp_path: Path) -> None:
    """docs/deploy.md's recipe for a cluster without GPUs: deploying each deployment by name with `--job-variable`
    overrides its GPU placement and image. (Prefect ignores these options with `--all`.)"""
    (tmp_path / "tiny.py").write_text("from prefect import flow\n\n\n@flow\ndef tiny() -> None:\n    pass\n")
    gpu = {"image": "dypo-rollout-gpu:0.1.0", "gpu_count": 1, "node_selector": {"dypo.io/node-pool": "rollout-gpu"}}
    names = ["override-a", "override-b"]
    spec = {"deployments": [{"name": name, "entrypoint": "tiny.py:tiny",
                             "work_pool": {"name": POOL, "job_variables": gpu}} for name in names]}
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    for name in names:
        result = prefect(work_pool, "--no-prompt", "deploy", "--name", name, "--job-variable",
                         '{"gpu_count": 0, "node_selector": {}, "image": "dypo-cpu:0.1.0"}', cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    stored = {d.name: d.job_variables for d in run(lambda client: client.read_deployments(), work_pool)}
    for name in names:
        assert stored[name] == {"image": "dypo-cpu:0.1.0", "gpu_count": 0, "node_selector": {}}
