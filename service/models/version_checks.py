"""The checks a version passes before it serves: the served file's inputs and outputs agree
with ``metadata.json``, and the reference batch reproduces its recorded outputs (the folded
model's, or the INT8 file's own when that serves) within their atol; then its warm-up at
the batch sizes it will serve."""

from __future__ import annotations

import time

import numpy as np

from foldserve.datatypes import ORT_DATATYPES
from foldserve.model_format import ModelVersionError
from service.models.served_version import ServedVersion


def check_io(model: ServedVersion) -> None:
    session = model.session(model.variant)
    files = model.metadata.files
    served = files.int8 if model.variant == "int8" else files.folded
    for kind, specs, actual in (
        ("input", model.inputs, session.get_inputs()),
        ("output", model.outputs, session.get_outputs()),
    ):
        found = {a.name: ORT_DATATYPES.get(a.type, a.type) for a in actual}
        for spec in specs:
            if spec.name not in found:
                raise ModelVersionError(
                    f"metadata {kind} '{spec.name}' is not in {served} ({', '.join(found)})"
                )
            if found[spec.name] != spec.datatype:
                raise ModelVersionError(
                    f"{kind} '{spec.name}': metadata says {spec.datatype}, "
                    f"{served} has {found[spec.name]}"
                )
        if kind == "input" and len(found) != len(specs):
            raise ModelVersionError(f"{served} has inputs that metadata.json does not list")


def check_reference(model: ServedVersion) -> float:
    """Run the reference batch (the warm-up) through the served file; return the largest
    output difference from what the metadata recorded for that file."""
    ref = model.metadata.reference
    outputs, atol = model.reference_outputs()
    feeds = {s.name: ref.inputs[s.name].array().astype(s.dtype) for s in model.inputs}
    results = model.run(feeds)
    worst = 0.0
    for name, tensor in outputs.items():
        if name not in results:
            raise ModelVersionError(f"reference batch: output '{name}' is not a model output")
        expected, got = tensor.array(), results[name]
        if got.shape != expected.shape:
            raise ModelVersionError(
                f"reference batch: output '{name}' has shape {list(got.shape)}, "
                f"metadata expects {list(expected.shape)}"
            )
        diff = float(np.max(np.abs(got.astype(np.float64) - expected), initial=0.0))
        if not diff <= atol:
            raise ModelVersionError(
                f"reference batch: output '{name}' differs from metadata by {diff:.3g} "
                f"> atol {atol:g}"
            )
        worst = max(worst, diff)
    return worst


def warm_sizes(model: ServedVersion) -> list[int]:
    """The batch sizes to warm: the powers of two up to the batcher's largest batch, and
    that largest batch (none when the model takes no batch axis or batching is off: the
    reference batch was its run)."""
    config = model.batcher.config
    if not (model.batcher.batchable and config.enabled):
        return []
    largest = config.max_batch_size
    powers = [1 << k for k in range(largest.bit_length())]  # each at most largest
    return sorted({*powers, largest})


def warm_up(model: ServedVersion) -> dict[int, float]:
    """Run each batch size the batcher may form twice, before the version serves; return
    the second run's seconds per size.

    ONNX Runtime's first run at a shape allocates its buffers (and on CUDA picks the
    convolution algorithms): without this the first requests of each batch size after
    readiness or a swap pay for it. The rows are the reference batch's, repeated.
    """
    ref = model.metadata.reference
    arrays = {s.name: ref.inputs[s.name].array().astype(s.dtype) for s in model.inputs}
    seconds: dict[int, float] = {}
    for size in warm_sizes(model):
        feeds = {
            name: np.take(array, np.arange(size) % len(array), axis=0)
            for name, array in arrays.items()
        }
        model.run(feeds)
        started = time.perf_counter()
        model.run(feeds)
        seconds[size] = time.perf_counter() - started
    return seconds
