"""Inference requests checked against a model, and the V1 form as a V2 request (pure functions).

A request is decoded (:mod:`service.rest.codec`, or :func:`v1_request`), checked
here against the served version's specs, run by that version
(:meth:`service.models.served_version.ServedVersion.infer`) and encoded. Decoding and
encoding run on the event loop for small bodies (cheaper than a thread hop) and
in a worker thread for large ones (``INLINE_*`` below), so a big JSON body
never stalls the loop for long.
"""

from __future__ import annotations

import numpy as np

from foldserve.model_format import TensorSpec
from service.errors import BadRequest
from service.models.batcher import Feeds
from service.rest.codec import (
    DecodedRequest,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    dump_json,
    parse_json_object,
)
from service.rest.json_data import cast_exact, json_array


def _names(items: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in items)


def prepare_feeds(
    model: str, specs: dict[str, TensorSpec], order: list[TensorSpec], inputs: list[InputTensor]
) -> Feeds:
    """Inputs checked against model ``model``'s ``specs`` (names, shapes, lossless datatype
    conversion); ``order`` is the specs as declared. Raises :class:`BadRequest`."""
    feeds: Feeds = {}
    for tensor in inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise BadRequest(
                f"unknown input '{tensor.name}'; model '{model}' takes {_names(list(specs))}"
            )
        if tensor.name in feeds:
            raise BadRequest(f"input '{tensor.name}' is given twice")
        shape = tensor.array.shape
        if not spec.accepts(shape):
            raise BadRequest(
                f"input '{tensor.name}': expected shape {list(spec.shape)}, got {list(shape)}"
            )
        if spec.shape[:1] == (-1,) and shape[0] == 0:
            raise BadRequest(f"input '{tensor.name}': batch size must be at least 1")
        converted = cast_exact(tensor.array, spec.dtype)
        if converted is None:
            raise BadRequest(
                f"input '{tensor.name}': expected datatype {spec.datatype}, got {tensor.datatype} "
                f"values that {spec.datatype} cannot represent exactly"
            )
        feeds[tensor.name] = converted
    missing = [name for name in specs if name not in feeds]
    if missing:
        raise BadRequest(f"missing input(s) {_names(missing)} of model '{model}'")
    if len(feeds) > 1:
        batches = {feeds[s.name].shape[0] for s in order if s.shape[:1] == (-1,)}
        if len(batches) > 1:
            raise BadRequest(f"inputs disagree on the batch size: {sorted(batches)}")
    return feeds


def select_outputs(
    model: str,
    names: list[str],
    requested: list[RequestedOutput] | None,
    every: list[RequestedOutput],
) -> list[RequestedOutput]:
    """The outputs to return: those ``requested`` (checked against ``names``), else ``every``."""
    if requested is None:
        return every
    seen: set[str] = set()
    for wanted in requested:
        if wanted.name not in names:
            raise BadRequest(
                f"unknown output '{wanted.name}'; model '{model}' gives {_names(names)}"
            )
        if wanted.name in seen:
            raise BadRequest(f"output '{wanted.name}' is requested twice")
        seen.add(wanted.name)
    return requested


def classify(scores: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Top-``k`` of the last axis as ``b"score:index[:label]"`` (Triton's format), highest first.

    ``scores`` of shape (..., C) gives an object array of shape (..., min(k, C)).
    """
    if scores.ndim == 0 or scores.shape[-1] == 0:
        raise BadRequest("classification needs an output with a class axis")
    rows = scores.reshape(-1, scores.shape[-1]).astype(np.float64)  # (R, C)
    k = min(k, rows.shape[1])
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]  # (R, k)
    out = np.empty(top.shape, dtype=object)
    for r, row in enumerate(top):
        for j, c in enumerate(row):
            label = f":{labels[c]}" if c < len(labels) else ""
            out[r, j] = f"{rows[r, c]:f}:{c}{label}".encode()
    return out.reshape((*scores.shape[:-1], k))


# Bodies (bytes) and outputs (elements) up to these sizes are handled on the event loop.
INLINE_BODY_BYTES = 64 * 1024
INLINE_OUTPUT_ELEMENTS = 16 * 1024


def output_elements(outputs: list[OutputTensor]) -> int:
    total = 0
    for tensor in outputs:
        total += tensor.array.size
    return total


def v1_request(body: bytes, model: str, inputs: list[TensorSpec]) -> DecodedRequest:
    """V1 ``{"instances": [...]}`` as the V2 request it means: one input, every output.

    Each instance is one sample of the model's single input, nested or flat.
    """
    if len(inputs) != 1:
        raise BadRequest(
            f"V1 predict serves single-input models; '{model}' takes {len(inputs)} "
            "inputs: use POST /v2/models/{name}/infer"
        )
    request = parse_json_object(body, "request body")
    instances = request.get("instances")
    if not isinstance(instances, list) or not instances:
        raise BadRequest("'instances' must be a non-empty list, one entry per sample")
    spec = inputs[0]
    array = json_array(instances, spec.datatype, "instances")
    sample = spec.shape[1:]
    if not spec.accepts(array.shape):
        flat_ok = -1 not in sample and array.shape[1:] == (int(np.prod(sample)),)
        if not flat_ok:
            raise BadRequest(
                f"instances: each instance must have shape {list(sample)}, "
                f"got {list(array.shape[1:])}"
            )
        array = array.reshape((array.shape[0], *sample))
    return DecodedRequest(
        id=None,
        inputs=[InputTensor(spec.name, spec.datatype, array)],
        outputs=None,
        binary_output=False,
        timeout_us=None,
    )


def predicted_labels(outputs: list[OutputTensor], labels: list[str]) -> list[str] | None:
    """The label of each sample's highest score, when the model names its classes: one
    output of shape (N, C) with ``C == len(labels)``; else None."""
    if len(outputs) != 1 or not labels:
        return None
    scores = outputs[0].array
    if scores.ndim != 2 or scores.shape[1] != len(labels) or scores.dtype.kind not in "fiu":
        return None
    return [labels[int(c)] for c in scores.argmax(axis=1)]


def encode_v1(outputs: list[OutputTensor], labels: list[str] | None = None) -> bytes:
    """``{"predictions": ...}``: the output's rows, or per sample ``{output: row}`` for several.

    With ``labels`` (the model's class names) and one (N, C) output, ``"labels"`` is added
    beside it: the predicted label of each instance (the argmax of its row), in order.
    """
    if len(outputs) == 1:
        predictions: object = outputs[0].array
    else:
        samples = len(outputs[0].array)
        predictions = [{t.name: t.array[i] for t in outputs} for i in range(samples)]
    body: dict[str, object] = {"predictions": predictions}
    named = predicted_labels(outputs, labels or [])
    if named is not None:
        body["labels"] = named
    return dump_json(body, [t.array for t in outputs])
