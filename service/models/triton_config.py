"""Triton's model configuration extension: ``GET /v2/models/{name}/config`` and the
``ModelConfig`` RPC, built from a served version (its specs, its batching) and its
model's ``config.json`` version policy.

A latency target maps onto Triton's queue policy where the two mean the same: a
request waits at most the target (``default_timeout_microseconds``), is refused with
UNAVAILABLE past it (``timeout_action: REJECT``), and may ask for less with its own
``timeout`` (``allow_timeout_override``: as in Triton, a request's timeout can shorten
the default, never lengthen it). The target itself, which Triton has no field for, is
in ``parameters``."""

from __future__ import annotations

from typing import Any

from service.models.config import VersionPolicy
from service.models.served_version import ServedVersion
from service.models.sessions import CUDA


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
    target = batching.latency_target_s
    queue: dict[str, Any] = {"max_queue_size": batching.max_queue_size}
    if target is not None:
        config["parameters"] = {"latency_target_ms": {"string_value": f"{target * 1e3:g}"}}
        queue["timeout_action"] = "REJECT"
        queue["default_timeout_microseconds"] = round(target * 1e6)
        queue["allow_timeout_override"] = True
    if batchable and batching.enabled:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "default_queue_policy": queue,
        }
    return config


def _policy(policy: VersionPolicy) -> dict[str, Any]:
    if policy.kind == "latest":
        return {"latest": {"num_versions": policy.latest}}
    if policy.kind == "specific":
        return {"specific": {"versions": list(policy.versions)}}
    return {"all": {}}
