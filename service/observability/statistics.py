"""Triton's model configuration and statistics extensions, built from what the service keeps.

The configuration comes from a served version (its specs, its batching) and its
model's ``config.json`` version policy. The statistics are read from the
Prometheus metrics (:mod:`service.observability.metrics`), so with several worker processes
they are the sums over all of them, like ``/metrics``. Durations are integer
nanoseconds, as Triton reports them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry

from service.models.config import VersionPolicy
from service.models.served_version import ServedVersion
from service.models.sessions import CUDA

Key = tuple[str, str]  # (model, version)
LAST_INFERENCE = "foldserve_last_inference_timestamp_seconds"
SUMMED = frozenset(
    {
        "foldserve_queue_wait_seconds_count",
        "foldserve_queue_wait_seconds_sum",
        "foldserve_request_compute_seconds_total",
        "foldserve_batch_size_sum",
        "foldserve_batch_requests_sum",
        "foldserve_inference_duration_seconds_count",
    }
)


def triton_model_config(served: ServedVersion, policy: VersionPolicy) -> dict[str, Any]:
    """Triton's ``GET /v2/models/{name}/config`` body for a served version."""
    batching = served.batcher.config
    batchable = served.batcher.batchable
    max_batch = batching.max_batch_size if batchable else 0

    def tensors(specs: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": s.name,
                "data_type": f"TYPE_{s.datatype}",
                "dims": list(s.shape[1:] if max_batch else s.shape),
            }
            for s in specs
        ]

    config: dict[str, Any] = {
        "name": served.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": _policy(policy),
        "max_batch_size": max_batch,
        "input": tensors(served.inputs),
        "output": tensors(served.outputs),
        "instance_group": [
            {"count": 1, "kind": "KIND_GPU" if served.provider == CUDA else "KIND_CPU"}
        ],
    }
    if batchable and batching.enabled:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "default_queue_policy": {"max_queue_size": batching.max_queue_size},
        }
    return config


def _policy(policy: VersionPolicy) -> dict[str, Any]:
    if policy.kind == "latest":
        return {"latest": {"num_versions": policy.latest}}
    if policy.kind == "specific":
        return {"specific": {"versions": list(policy.versions)}}
    return {"all": {}}


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def _stat(count: float, seconds: float) -> dict[str, int]:
    return {"count": int(count), "ns": _ns(seconds)}


def model_statistics(registry: CollectorRegistry, versions: list[Key]) -> dict[str, Any]:
    """Triton's ``GET /v2/models[/{name}[/versions/{v}]]/stats`` body for ``versions``."""
    value: dict[tuple[str, Key], float] = defaultdict(float)
    by_status: dict[tuple[str, Key], float] = defaultdict(float)
    batches: dict[Key, dict[int, list[float]]] = defaultdict(
        lambda: defaultdict(lambda: [0.0, 0.0])
    )
    for family in registry.collect():
        for sample in family.samples:
            labels = sample.labels
            key = (labels.get("model", ""), labels.get("version", ""))
            name = sample.name
            if name == "foldserve_request_duration_seconds_count":
                by_status[("ok" if labels["status"] == "200" else "fail", key)] += sample.value
            elif name == "foldserve_request_duration_seconds_sum":
                by_status[("ok_s" if labels["status"] == "200" else "fail_s", key)] += sample.value
            elif name == "foldserve_request_codec_seconds_total":
                value[(labels["stage"], key)] += sample.value
            elif name == "foldserve_batch_executions_total":
                batches[key][int(labels["batch_size"])][0] += sample.value
            elif name == "foldserve_batch_execution_seconds_total":
                batches[key][int(labels["batch_size"])][1] += sample.value
            elif name == LAST_INFERENCE:
                value[(name, key)] = max(value[(name, key)], sample.value)
            elif name in SUMMED:
                value[(name, key)] += sample.value
    stats = []
    for key in versions:
        ok = by_status[("ok", key)]
        computed = value[("foldserve_batch_requests_sum", key)]
        stats.append(
            {
                "name": key[0],
                "version": key[1],
                "last_inference": int(value[(LAST_INFERENCE, key)] * 1e3),  # ms
                "inference_count": int(value[("foldserve_batch_size_sum", key)]),
                "execution_count": int(value[("foldserve_inference_duration_seconds_count", key)]),
                "inference_stats": {
                    "success": _stat(ok, by_status[("ok_s", key)]),
                    "fail": _stat(by_status[("fail", key)], by_status[("fail_s", key)]),
                    "queue": _stat(
                        value[("foldserve_queue_wait_seconds_count", key)],
                        value[("foldserve_queue_wait_seconds_sum", key)],
                    ),
                    "compute_input": _stat(ok, value[("decode", key)]),
                    "compute_infer": _stat(
                        computed, value[("foldserve_request_compute_seconds_total", key)]
                    ),
                    "compute_output": _stat(ok, value[("encode", key)]),
                },
                "batch_stats": [
                    {"batch_size": size, "compute_infer": _stat(count, seconds)}
                    for size, (count, seconds) in sorted(batches[key].items())
                ],
            }
        )
    return {"model_stats": stats}
