"""The V1 predict form: ``{"instances": [...]}`` in as the V2 request it means,
``{"predictions": [...]}`` (and ``"labels"``) out."""

from __future__ import annotations

import numpy as np

from foldserve.model_format import TensorSpec
from service.dataplane.tensors import DecodedRequest, InputTensor, OutputTensor
from service.errors import BadRequest
from service.rest.codec import dump_json, parse_json_object
from service.rest.json_data import json_array


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
