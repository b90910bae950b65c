"""The Kubernetes and KServe manifests are valid and agree with the service they deploy.

Offline: the core kinds against the Kubernetes API schemas (kubernetes-validate,
strict: an unknown field is an error), the KServe InferenceService against the
schema of KServe's CRD (vendored in deploy/k8s/schemas); then the probes,
ports, environment names and values, mounts and the repository path against
the service's real routes and Settings, and the autoscaler's pending-requests
metric and its prometheus-adapter rule against the gauge the service registers.
tests/deploy/test_image.py checks the Dockerfile; deploy/image_check.sh builds
and runs the images.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from service.observability.metrics import ServiceMetrics
from service.settings import Settings
from tests import ROOT

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"
KSERVE_SCHEMA = K8S / "schemas" / "inferenceservice-serving.kserve.io-v1beta1.json"
# KServe's own variables in a custom predictor container: its protocol and model location.
KSERVE_ENV = {"PROTOCOL", "STORAGE_URI"}
KSERVE_MODEL_DIR = "/mnt/models"  # where KServe mounts a STORAGE_URI (DefaultModelLocalMountPath)
# Container port names: ours, and KServe's (http1 for HTTP/1.1, h2c for gRPC; one per container).
HTTP_PORT_NAMES = {"http", "http1"}
GRPC_PORT = Settings.model_fields["grpc_port"].default  # the service's own default, Triton's
GRPC_PORT_NAMES = {"grpc", "h2c"}
HEALTH_PORT_NAME = "health"  # FOLDSERVE_HEALTH_PORT: the supervisor's liveness
ADAPTER_FILE = "autoscaling/prometheus-adapter.yaml"
# prometheus-adapter's config file (pkg/config/config.go): its top-level lists, a rule's
# fields, and the fields its metricsQuery template gets (pkg/naming/metrics_query.go).
ADAPTER_CONFIG_FIELDS = {"rules", "resourceRules", "externalRules"}
ADAPTER_RULE_FIELDS = {
    "seriesQuery",
    "seriesFilters",
    "resources",
    "name",
    "metricsQuery",
    "labelValueReplacements",
}
ADAPTER_REQUIRED = {"seriesQuery", "resources", "name", "metricsQuery"}
ADAPTER_QUERY_FIELDS = {"Series", "LabelMatchers", "LabelValuesByName", "GroupBy", "GroupBySlice"}


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            found.append((str(path.relative_to(K8S)), doc))
    return found


MANIFESTS = _manifests()
CORE = [(f, d) for f, d in MANIFESTS if d["kind"] != "InferenceService"]


def _one(kind: str, file: str | None = None) -> dict[str, Any]:
    docs = [d for f, d in MANIFESTS if d["kind"] == kind and (file is None or f == file)]
    assert len(docs) == 1, (kind, file, len(docs))
    return docs[0]


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec that runs the serving image: the Deployments and KServe's predictor."""
    specs = [(f, d["spec"]["template"]["spec"]) for f, d in MANIFESTS if d["kind"] == "Deployment"]
    specs += [(f, d["spec"]["predictor"]) for f, d in MANIFESTS if d["kind"] == "InferenceService"]
    return specs


def _serving_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(f, spec, spec["containers"][0]) for f, spec in _pod_specs()]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


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
    isvc = _one("InferenceService", file)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    errors = [e.message for e in kserve_validator.iter_errors(isvc)]
    assert errors == []
    # KServe routes one port of a custom container: HTTP (http1) or gRPC (h2c).
    (port,) = isvc["spec"]["predictor"]["containers"][0]["ports"]
    assert port["name"] in {"http1", "h2c"}


def test_validation_rejects_misspelt_fields(kserve_validator: jsonschema.Draft7Validator) -> None:
    deployment = copy.deepcopy(_one("Deployment", "deployment.yaml"))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["periodSecond"] = probe.pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    # A custom predictor has no protocolVersion field (KServe reads PROTOCOL instead).
    isvc = copy.deepcopy(_one("InferenceService", "kserve/inferenceservice.yaml"))
    isvc["spec"]["predictor"]["protocolVersion"] = "v2"
    assert any("protocolVersion" in e.message for e in kserve_validator.iter_errors(isvc))


# --- the manifests agree with the service


@pytest.mark.parametrize(("file", "spec", "container"), _serving_containers())
def test_probes_hit_real_routes_on_the_served_port(
    file: str, spec: dict[str, Any], container: dict[str, Any], routes: set[str]
) -> None:
    env = _env(container)
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
        env = _env(pod["containers"][0])
        drain = Settings(drain_seconds=env.get("FOLDSERVE_DRAIN_SECONDS", 5.0)).drain_seconds
        assert pod["terminationGracePeriodSeconds"] >= drain + 20, file


@pytest.mark.parametrize(("file", "spec", "container"), _serving_containers())
def test_environment_names_and_values_are_real_settings(
    file: str, spec: dict[str, Any], container: dict[str, Any]
) -> None:
    env = _env(container)
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
    env = _env(container)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    if "STORAGE_URI" in env:  # KServe mounts the storage URI's volume itself, read-only
        assert env["STORAGE_URI"].startswith("pvc://")
        assert env["FOLDSERVE_REPOSITORY"] == KSERVE_MODEL_DIR
    else:
        models = mounts[env["FOLDSERVE_REPOSITORY"]]
        assert models["readOnly"] is True
        claim = volumes[models["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] == _one("PersistentVolumeClaim")["metadata"]["name"]
    runtime = mounts[env["FOLDSERVE_RUNTIME_DIR"]]
    assert not runtime.get("readOnly", False)
    assert "emptyDir" in volumes[runtime["name"]]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # Python's and uvicorn's temp files
    assert spec["securityContext"]["runAsUser"] == _image_uid()


def test_service_autoscaler_and_gpu_variant_target_the_deployment() -> None:
    cpu = _one("Deployment", "deployment.yaml")
    gpu = _one("Deployment", "gpu/deployment.yaml")
    service, hpa = _one("Service"), _one("HorizontalPodAutoscaler")
    labels = cpu["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == labels == gpu["spec"]["template"]["metadata"]["labels"]
    for deployment in (cpu, gpu):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = _env(container)
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
    assert _env(gpu_container)["FOLDSERVE_PROVIDERS"] == "cuda"
    assert gpu_container["image"].endswith(":serve-gpu")


def test_training_job_writes_where_the_replicas_read() -> None:
    job = _one("Job")["spec"]["template"]["spec"]
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


# --- autoscaling on pending requests (docs/deploy.md, "Autoscaling on pending requests")


@pytest.fixture(scope="module")
def pending() -> Metric:
    """foldserve_pending_requests as a server's /metrics exposes it, one model's series set."""
    metrics = ServiceMetrics()
    metrics.pending_requests.labels("resnet_bench").set(3)
    (gauge,) = metrics.pending_requests.describe()
    text = generate_latest(metrics.registry).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == gauge.name]
    return family


def _gauge_labels(family: Metric) -> set[str]:
    return {label for sample in family.samples for label in sample.labels}


def _adapter_rules() -> list[dict[str, Any]]:
    config = _one("ConfigMap", ADAPTER_FILE)["data"]["config.yaml"]
    return list(yaml.safe_load(config)["rules"])


def _cpus(quantity: str | int | float) -> float:
    """A CPU quantity ("1600m", "2", 2) in CPUs."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _series_query(query: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """A series selector's metric name and its label matchers, {label: (operator, value)}."""
    found = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}", query.strip())
    assert found, f"not a series selector of one metric: {query!r}"
    matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', found[2])
    return found[1], {label: (op, value) for label, op, value in matchers}


def _adapter_name(rule: dict[str, Any], series: str) -> str | None:
    """The custom-metrics API name the adapter gives ``series`` (pkg/naming/metric_namer.go:
    ``matches`` defaults to ``.*``, ``as`` to ``$0``, or ``$1`` with one capture group)."""
    matches = re.compile(rule["name"].get("matches") or ".*")
    found = matches.search(series)
    if found is None:
        return None
    template = rule["name"].get("as") or ("$0" if matches.groups == 0 else "$1")
    return found.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", template))


def _adapter_query(
    rule: dict[str, Any], series: str, namespace: str, pods: list[str], selector: dict[str, str]
) -> str:
    """The PromQL the adapter sends for ``series`` on several ``pods`` given the HPA's metric
    selector (matchLabels), built as pkg/naming/metrics_query.go's Build does: the
    selector's matchers, then the namespace's, then the pods' in <<.LabelMatchers>>."""
    label = {v["resource"]: k for k, v in rule["resources"]["overrides"].items()}
    matchers = [f'{key}="{value}"' for key, value in selector.items()]
    matchers += [f'{label["namespace"]}="{namespace}"', f'{label["pod"]}=~"{"|".join(pods)}"']
    fields = {"Series": series, "LabelMatchers": ",".join(matchers), "GroupBy": label["pod"]}
    return re.sub(r"<<\s*\.(\w+)\s*>>", lambda field: fields[field[1]], rule["metricsQuery"])


def _rule_problems(rule: dict[str, Any], series: str, model_label: str, hpa_name: str) -> list[str]:
    """What would keep the HPA's metric ``hpa_name`` from reading ``series`` per pod through
    ``rule``, with a selector on ``model_label``; empty when nothing would."""
    problems = []
    name, matchers = _series_query(rule["seriesQuery"])
    if name != series:
        problems.append(f"seriesQuery finds {name!r}, the server exports {series!r}")
    overrides = rule["resources"]["overrides"]
    if sorted(v["resource"] for v in overrides.values()) != ["namespace", "pod"]:
        problems.append(f"resources map {overrides} to namespace and pod")
    # Only series that name their pod; the gauge's own label is left free for the selector.
    if matchers != dict.fromkeys(overrides, ("!=", "")):
        problems.append(f"seriesQuery matches {matchers}, not the pod's labels alone")
    if _adapter_name(rule, series) != hpa_name:
        problems.append(f"the adapter names {series!r} {_adapter_name(rule, series)!r}")
    model = "resnet_bench"
    pods = ["foldserve-a", "foldserve-b"]
    query = _adapter_query(rule, series, "default", pods, {model_label: model})
    selected = re.search(rf"{re.escape(series)}\{{([^}}]*)\}}", query)
    if selected is None or f'{model_label}="{model}"' not in selected[1].split(","):
        problems.append(f"the model selector does not filter the series: {query}")
    pod_label = next(k for k, v in overrides.items() if v["resource"] == "pod")
    if not re.search(rf"by\s*\(\s*{pod_label}\s*\)", query):
        problems.append(f"not one value per pod: {query}")
    return problems


def test_autoscaler_scales_on_pending_requests_with_cpu_as_fallback(pending: Metric) -> None:
    spec = _one("HorizontalPodAutoscaler")["spec"]
    pods = [m["pods"] for m in spec["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == [pending.name]
    for metric in pods:
        assert metric["target"]["type"] == "AverageValue"  # per pod: what Pods metrics take
        selector = metric["metric"].get("selector", {})
        assert set(selector.get("matchLabels", {})) <= _gauge_labels(pending)
    (cpu,) = [m["resource"] for m in spec["metrics"] if m["type"] == "Resource"]
    assert cpu["name"] == "cpu"
    # The fallback must be reachable: under the CPU limit of each variant it scales.
    for file in ("deployment.yaml", "gpu/deployment.yaml"):
        resources = _one("Deployment", file)["spec"]["template"]["spec"]["containers"][0][
            "resources"
        ]
        target = cpu["target"]
        per_pod = (
            _cpus(target["averageValue"])
            if target["type"] == "AverageValue"
            else target["averageUtilization"] / 100 * _cpus(resources["requests"]["cpu"])
        )
        assert per_pod < _cpus(resources["limits"]["cpu"]), file
    behavior = spec["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_adapter_config_holds_complete_rules_in_the_adapters_namespace() -> None:
    config_map = _one("ConfigMap", ADAPTER_FILE)
    # The adapter's namespace, set here; FoldServe's objects (deploy/k8s/*.yaml) take the
    # current one, and `kubectl apply -f deploy/k8s/` does not reach this folder.
    assert config_map["metadata"]["namespace"]
    assert all("namespace" not in d["metadata"] for f, d in MANIFESTS if "/" not in f)
    assert set(config_map["data"]) == {"config.yaml"}  # the file the adapter's --config names
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert set(config) <= ADAPTER_CONFIG_FIELDS and config["rules"]
    for rule in config["rules"]:
        assert ADAPTER_REQUIRED <= set(rule) <= ADAPTER_RULE_FIELDS, set(rule)
        assert set(rule["name"]) <= {"matches", "as"}
        assert set(rule["resources"]) <= {"template", "overrides"}
        for resource in rule["resources"].get("overrides", {}).values():
            assert set(resource) <= {"group", "resource"} and resource["resource"]
        fields = set(re.findall(r"<<\s*\.(\w+)\s*>>", rule["metricsQuery"]))
        assert {"Series", "LabelMatchers", "GroupBy"} <= fields <= ADAPTER_QUERY_FIELDS


def test_adapter_rule_serves_the_gauge_the_server_exports(pending: Metric) -> None:
    (model_label,) = _gauge_labels(pending)  # per model: what a selector picks
    (rule,) = _adapter_rules()
    hpa = _one("HorizontalPodAutoscaler")["spec"]
    for metric in [m["pods"]["metric"] for m in hpa["metrics"] if m["type"] == "Pods"]:
        assert _rule_problems(rule, pending.name, model_label, metric["name"]) == []


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("seriesQuery", 'foldserve_pending_request{namespace!="",pod!=""}', "seriesQuery finds"),
        ("seriesQuery", 'foldserve_pending_requests{pod!="",model=""}', "seriesQuery matches"),
        ("name", {"matches": "^(.*)_requests$"}, "the adapter names"),
        ("metricsQuery", "sum(<<.Series>>) by (<<.GroupBy>>)", "does not filter"),
        ("metricsQuery", "sum(<<.Series>>{<<.LabelMatchers>>}) by (model)", "per pod"),
    ],
)
def test_adapter_rule_check_rejects_a_wrong_rule(
    pending: Metric, field: str, value: Any, problem: str
) -> None:
    (model_label,) = _gauge_labels(pending)
    rule = copy.deepcopy(_adapter_rules()[0])
    rule[field] = value
    problems = _rule_problems(rule, pending.name, model_label, pending.name)
    assert any(problem in p for p in problems), problems
