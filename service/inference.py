"""Inference on a loaded model: check the request against the model, run, shape the answer.

Blocking work (decoding, ONNX Runtime, encoding) happens here, off the event
loop: routes call these functions in a worker thread.
"""

from __future__ import annotations

import json
import time

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from service.codecs import (
    DecodedRequest,
    EncodedResponse,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    cast_exact,
    decode_infer_request,
    encode_infer_response,
    json_array,
    parse_json_object,
)
from service.errors import BadRequest
from service.metrics import RequestRecord, ServiceMetrics
from service.protocol import V2_DATATYPES
from service.repository import ModelRepository
from service.runtime import LoadedModel


def _names(items: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in items)


def prepare_feeds(model: LoadedModel, inputs: list[InputTensor]) -> dict[str, np.ndarray]:
    """Inputs checked against the model (names, shapes, lossless datatype conversion)."""
    specs = {spec.name: spec for spec in model.inputs}
    feeds: dict[str, np.ndarray] = {}
    for tensor in inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise BadRequest(
                f"unknown input '{tensor.name}'; model '{model.name}' takes {_names(list(specs))}"
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
        raise BadRequest(f"missing input(s) {_names(missing)} of model '{model.name}'")
    batches = {feeds[s.name].shape[0] for s in model.inputs if s.shape[:1] == (-1,)}
    if len(batches) > 1:
        raise BadRequest(f"inputs disagree on the batch size: {sorted(batches)}")
    return feeds


def select_outputs(model: LoadedModel, request: DecodedRequest) -> list[RequestedOutput]:
    """The outputs to return: those asked for (checked), else all of them."""
    if request.outputs is None:
        return [RequestedOutput(name, None, 0) for name in model.output_names]
    seen: set[str] = set()
    for wanted in request.outputs:
        if wanted.name not in model.output_names:
            raise BadRequest(
                f"unknown output '{wanted.name}'; model '{model.name}' gives "
                f"{_names(model.output_names)}"
            )
        if wanted.name in seen:
            raise BadRequest(f"output '{wanted.name}' is requested twice")
        seen.add(wanted.name)
    return request.outputs


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


def run_model(
    model: LoadedModel, feeds: dict[str, np.ndarray], names: list[str], metrics: ServiceMetrics
) -> dict[str, np.ndarray]:
    """ONNX Runtime call, timed; a shape the runtime rejects is the client's error."""
    start = time.perf_counter()
    try:
        results = model.run(feeds, names)
    except InvalidArgument as err:
        raise BadRequest(f"the model rejected the inputs: {str(err).splitlines()[0]}") from err
    batch = next(iter(feeds.values())).shape[0] if feeds else 0
    metrics.observe_inference(model.name, str(model.version), time.perf_counter() - start, batch)
    return results


def infer_v2(
    repository: ModelRepository,
    metrics: ServiceMetrics,
    record: RequestRecord,
    target: tuple[str, str | None],
    body: bytes,
    header_length: str | None,
    request_id: str,
) -> EncodedResponse:
    """Answer one V2 infer request for ``target`` = (model name, version or None)."""
    model = repository.get(*target)
    record.version = str(model.version)
    request = decode_infer_request(body, header_length)
    feeds = prepare_feeds(model, request.inputs)
    wanted = select_outputs(model, request)
    results = run_model(model, feeds, [w.name for w in wanted], metrics)
    outputs = []
    for w in wanted:
        binary = request.binary_output if w.binary is None else w.binary
        array = results[w.name]
        if w.classification:
            outputs.append(
                OutputTensor(
                    w.name, "BYTES", classify(array, w.classification, model.labels), binary
                )
            )
        else:
            outputs.append(OutputTensor(w.name, V2_DATATYPES[array.dtype], array, binary))
    return encode_infer_response(model.name, str(model.version), request.id or request_id, outputs)


def predict_v1(
    repository: ModelRepository,
    metrics: ServiceMetrics,
    record: RequestRecord,
    name: str,
    body: bytes,
) -> bytes:
    """V1 ``{"instances": [...]}`` -> ``{"predictions": [...]}``: one instance per sample."""
    model = repository.get(name)
    record.version = str(model.version)
    if len(model.inputs) != 1:
        raise BadRequest(
            f"V1 predict serves single-input models; '{name}' takes {len(model.inputs)} "
            "inputs: use POST /v2/models/{name}/infer"
        )
    request = parse_json_object(body, "request body")
    instances = request.get("instances")
    if not isinstance(instances, list) or not instances:
        raise BadRequest("'instances' must be a non-empty list, one entry per sample")
    spec = model.inputs[0]
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
    results = run_model(model, {spec.name: array}, model.output_names, metrics)
    if len(results) == 1:
        predictions = next(iter(results.values())).tolist()
    else:
        predictions = [
            {n: results[n][i].tolist() for n in model.output_names} for i in range(len(array))
        ]
    return json.dumps({"predictions": predictions}, separators=(",", ":")).encode()
