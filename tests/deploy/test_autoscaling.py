"""The autoscaler scales on the pending-requests gauge the service exports, with CPU as the
fallback, through a prometheus-adapter rule that serves that gauge (docs/deploy.md,
"Autoscaling on pending requests"): checked offline against the service's own registry."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from service.observability.metrics import ServiceMetrics
from tests.deploy.manifests import MANIFESTS, one

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
    config = one("ConfigMap", ADAPTER_FILE)["data"]["config.yaml"]
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
    spec = one("HorizontalPodAutoscaler")["spec"]
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
        resources = one("Deployment", file)["spec"]["template"]["spec"]["containers"][0][
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
    config_map = one("ConfigMap", ADAPTER_FILE)
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
    hpa = one("HorizontalPodAutoscaler")["spec"]
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
