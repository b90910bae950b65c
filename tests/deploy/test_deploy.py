"""The Kubernetes and KServe manifests are valid and agree with the service they deploy.

Offline: the core kinds against the Kubernetes API schemas (kubernetes-validate,
strict: an unknown field is an error), the KServe InferenceService against the
schema of KServe's CRD (vendored in deploy/k8s/schemas); then the probes,
ports, environment names and values, mounts and the repository path against
the service's real routes and Settings. tests/deploy/test_autoscaling.py checks
the autoscaler, tests/deploy/test_image.py the Dockerfile; deploy/image_check.sh
builds and runs the images.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from service.settings import Settings
from tests import ROOT
from tests.deploy.manifests import K8S, KUBERNETES_VERSION, MANIFESTS, env_of, one

KSERVE_SCHEMA = K8S / "schemas" / "inferenceservice-serving.kserve.io-v1beta1.json"
# KServe's own variables in a custom predictor container: its protocol and model location.
KSERVE_ENV = {"PROTOCOL", "STORAGE_URI"}
KSERVE_MODEL_DIR = "/mnt/models"  # where KServe mounts a STORAGE_URI (DefaultModelLocalMountPath)
# Container port names: ours, and KServe's (http1 for HTTP/1.1, h2c for gRPC; one per container).
HTTP_PORT_NAMES = {"http", "http1"}
GRPC_PORT = Settings.model_fields["grpc_port"].default  # the service's own default, Triton's
GRPC_PORT_NAMES = {"grpc", "h2c"}
HEALTH_PORT_NAME = "health"  # FOLDSERVE_HEALTH_PORT: the supervisor's liveness
CORE = [(f, d) for f, d in MANIFESTS if d["kind"] != "InferenceService"]


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec that runs the serving image: the Deployments and KServe's predictor."""
    specs = [(f, d["spec"]["template"]["spec"]) for f, d in MANIFESTS if d["kind"] == "Deployment"]
    specs += [(f, d["spec"]["predictor"]) for f, d in MANIFESTS if d["kind"] == "InferenceService"]
    return specs


def _serving_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(f, spec, spec["containers"][0]) for f, spec in _pod_specs()]


def _strict(schema: Any) -> Any:
    """A CRD schema that, like the API server's strict field validation, rejects unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def kserve_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_strict(json.loads(KSERVE_SCHEMA.read_text())))


# --- the manifests are valid Kubernetes and KServe objects


@pytest.mark.parametrize(("file", "doc"), CORE, ids=[f"{f}:{d['kind']}" for f, d in CORE])
def test_core_manifests_match_the_kubernetes_schemas(file: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_there_is_an_inference_service_for_http_and_one_for_grpc() -> None:
    assert [f for f, d in MANIFESTS if d["kind"] == "InferenceService"] == [
        "kserve/inferenceservice-grpc.yaml",
        "kserve/inferenceservice.yaml",
    ]


@pytest.mark.parametrize("file", [f for f, d in MANIFESTS if d["kind"] == "InferenceService"])
def test_inference_service_matches_kserves_crd_schema(
    file: str, kserve_validator: jsonschema.Draft7Validator
) -> None:
    isvc = one("InferenceService", file)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    errors = [e.message for e in kserve_validator.iter_errors(isvc)]
    assert errors == []
    # KServe routes one port of a custom container: HTTP (http1) or gRPC (h2c).
    (port,) = isvc["spec"]["predictor"]["containers"][0]["ports"]
    assert port["name"] in {"http1", "h2c"}


def test_validation_rejects_misspelt_fields(kserve_validator: jsonschema.Draft7Validator) -> None:
    deployment = copy.deepcopy(one("Deployment", "deployment.yaml"))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["periodSecond"] = probe.pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    # A custom predictor has no protocolVersion field (KServe reads PROTOCOL instead).
    isvc = copy.deepcopy(one("InferenceService", "kserve/inferenceservice.yaml"))
    isvc["spec"]["predictor"]["protocolVersion"] = "v2"
    assert any("protocolVersion" in e.message for e in kserve_validator.iter_errors(isvc))


# --- the manifests agree with the service


@pytest.mark.parametrize(("file", "spec", "container"), _serving_containers())
def test_probes_hit_real_routes_on_the_served_port(
    file: str, spec: dict[str, Any], container: dict[str, Any], routes: set[str]
) -> None:
    env = env_of(container)
    settings = Settings(
        port=env["FOLDSERVE_PORT"],
        grpc_port=env.get("FOLDSERVE_GRPC_PORT", 8001),
        health_port=env.get("FOLDSERVE_HEALTH_PORT", 0),
    )
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports) <= HTTP_PORT_NAMES | GRPC_PORT_NAMES | {HEALTH_PORT_NAME} and ports
    for name, number in ports.items():
        if name == HEALTH_PORT_NAME:
            assert number == settings.health_port != 0
        else:
            assert number == (settings.port if name in HTTP_PORT_NAMES else settings.grpc_port)
    assert env["FOLDSERVE_HOST"] == "0.0.0.0"
    # The probes go over HTTP, declared or not (KServe's gRPC predictor declares only h2c).
    http_names = set(ports) & HTTP_PORT_NAMES
    serving = {settings.port} | http_names
    # Liveness asks the supervisor where it answers (also while every worker loads).
    health = {settings.health_port, HEALTH_PORT_NAME} if settings.health_port else serving
    expected = {
        "readinessProbe": ("/v2/health/ready", serving),
        "livenessProbe": ("/v2/health/live", health),
        "startupProbe": ("/v2/health/ready", serving),  # refused until the models are loaded
    }
    for probe, (path, ports_allowed) in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in routes
        assert get["port"] in ports_allowed, (probe, get["port"])
    if HEALTH_PORT_NAME in ports:
        assert container["livenessProbe"]["httpGet"]["port"] in health


def test_deployments_roll_out_without_lowering_capacity() -> None:
    """A rollout adds a ready replica before it stops one; the grace period outlasts the
    drain (FOLDSERVE_DRAIN_SECONDS, the default when unset) with time for requests."""
    deployments = [(f, d) for f, d in MANIFESTS if d["kind"] == "Deployment"]
    assert len(deployments) == 2
    for file, doc in deployments:
        assert doc["spec"]["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        }, file
        pod = doc["spec"]["template"]["spec"]
        env = env_of(pod["containers"][0])
        drain = Settings(drain_seconds=env.get("FOLDSERVE_DRAIN_SECONDS", 5.0)).drain_seconds
        assert pod["terminationGracePeriodSeconds"] >= drain + 20, file


@pytest.mark.parametrize(("file", "spec", "container"), _serving_containers())
def test_environment_names_and_values_are_real_settings(
    file: str, spec: dict[str, Any], container: dict[str, Any]
) -> None:
    env = env_of(container)
    fields = {f"FOLDSERVE_{name.upper()}": name for name in Settings.model_fields}
    allowed = set(fields) | (KSERVE_ENV if container["name"] == "kserve-container" else set())
    assert set(env) <= allowed, set(env) - allowed
    plain: dict[str, Any] = {
        fields[k]: v for k, v in env.items() if k in fields and isinstance(v, str)
    }
    settings = Settings(**plain)  # raises on a value the service would refuse
    assert settings.workers * settings.threads <= float(container["resources"]["limits"]["cpu"])
    # Management routes are keyed, from a Secret.
    assert "secretKeyRef" in env["FOLDSERVE_API_KEY"]


@pytest.mark.parametrize(("file", "spec", "container"), _serving_containers())
def test_repository_is_mounted_read_only_and_runtime_dir_writable(
    file: str, spec: dict[str, Any], container: dict[str, Any]
) -> None:
    env = env_of(container)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    if "STORAGE_URI" in env:  # KServe mounts the storage URI's volume itself, read-only
        assert env["STORAGE_URI"].startswith("pvc://")
        assert env["FOLDSERVE_REPOSITORY"] == KSERVE_MODEL_DIR
    else:
        models = mounts[env["FOLDSERVE_REPOSITORY"]]
        assert models["readOnly"] is True
        claim = volumes[models["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] == one("PersistentVolumeClaim")["metadata"]["name"]
    runtime = mounts[env["FOLDSERVE_RUNTIME_DIR"]]
    assert not runtime.get("readOnly", False)
    assert "emptyDir" in volumes[runtime["name"]]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # Python's and uvicorn's temp files
    assert spec["securityContext"]["runAsUser"] == _image_uid()


def test_service_autoscaler_and_gpu_variant_target_the_deployment() -> None:
    cpu = one("Deployment", "deployment.yaml")
    gpu = one("Deployment", "gpu/deployment.yaml")
    service, hpa = one("Service"), one("HorizontalPodAutoscaler")
    labels = cpu["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == labels == gpu["spec"]["template"]["metadata"]["labels"]
    for deployment in (cpu, gpu):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = env_of(container)
        # The gRPC port is set explicitly, to the service's own default.
        assert ports["grpc"] == int(env["FOLDSERVE_GRPC_PORT"]) == GRPC_PORT
        assert ports["http"] == int(env["FOLDSERVE_PORT"])
    targets = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert targets == {"http": "http", "grpc": "grpc"}
    (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    # h2c: gRPC without TLS, so that ingresses and meshes speak HTTP/2 to it.
    assert grpc["appProtocol"] == "kubernetes.io/h2c" and grpc["port"] == GRPC_PORT
    assert (
        hpa["spec"]["scaleTargetRef"]["name"] == cpu["metadata"]["name"] == gpu["metadata"]["name"]
    )
    gpu_container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(gpu_container)["FOLDSERVE_PROVIDERS"] == "cuda"
    assert gpu_container["image"].endswith(":serve-gpu")


def test_training_job_writes_where_the_replicas_read() -> None:
    job = one("Job")["spec"]["template"]["spec"]
    (container,) = job["containers"]
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in job["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "foldserve-models"
    args = container["args"]
    assert args[0] == "defaults" and args[args.index("--repository") + 1] == mount["mountPath"]
    assert container["image"].endswith(":train")


def _image_uid() -> int:
    """The images' user (the Dockerfile's USER): the pods must run as it."""
    (uid,) = set(re.findall(r"^USER (\d+):", (ROOT / "Dockerfile").read_text(), re.M))
    return int(uid)
