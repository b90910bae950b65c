"""Triton's statistics extension, read from what the service measures.

The statistics are read from the Prometheus metrics
(:mod:`service.observability.metrics`), so with several worker processes they are the
sums over all of them, like ``/metrics``: success and fail from
``foldserve_request_duration_seconds``, queue from ``foldserve_queue_wait_seconds``,
compute_input, compute_infer and compute_output from the same-named phases of
``foldserve_request_phase_seconds`` (count and sum: the statistics and the histograms
cannot disagree). Durations are integer nanoseconds, as Triton reports them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry

Key = tuple[str, str]  # (model, version)
LAST_INFERENCE = "foldserve_last_inference_timestamp_seconds"
SUMMED = frozenset(
    {
        "foldserve_queue_wait_seconds_count",
        "foldserve_queue_wait_seconds_sum",
        "foldserve_batch_size_sum",
        "foldserve_inference_duration_seconds_count",
    }
)
PHASE = "foldserve_request_phase_seconds"


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
            elif name in (f"{PHASE}_count", f"{PHASE}_sum"):
                value[(labels["phase"] + name[len(PHASE) :], key)] += sample.value
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

        def phase(name: str, key: Key = key) -> dict[str, int]:
            return _stat(value[(f"{name}_count", key)], value[(f"{name}_sum", key)])

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
                    "compute_input": phase("compute_input"),
                    "compute_infer": phase("compute_infer"),
                    "compute_output": phase("compute_output"),
                },
                "batch_stats": [
                    {"batch_size": size, "compute_infer": _stat(count, seconds)}
                    for size, (count, seconds) in sorted(batches[key].items())
                ],
            }
        )
    return {"model_stats": stats}
