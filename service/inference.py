"""Inference on a loaded model: check the request against the model, run, shape the answer.

The request is decoded and checked, queued on the model version's dynamic
batcher (:mod:`service.batching`), which runs ONNX Runtime in a worker thread,
and its own rows are encoded. Decoding and encoding run on the event loop for
small bodies (cheaper than a thread hop) and in a worker thread for large ones,
so a big JSON body never stalls the loop for long.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from service.batching import BatcherRegistry, Outputs, Receive
from service.codecs import (
    DecodedRequest,
    EncodedResponse,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    cast_exact,
    decode_infer_request,
    dump_json,
    encode_infer_response,
    json_array,
    parse_json_object,
)
from service.errors import BadRequest
from service.metrics import RequestRecord
from service.protocol import V2_DATATYPES
from service.repository import ModelRepository
from service.runtime import LoadedModel

# Per loaded model, the outputs of a request that names none (read-only; weakly keyed).
_EVERY_OUTPUT: weakref.WeakKeyDictionary[LoadedModel, list[RequestedOutput]] = (
    weakref.WeakKeyDictionary()
)


def _names(items: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in items)


def prepare_feeds(model: LoadedModel, inputs: list[InputTensor]) -> dict[str, np.ndarray]:
    """Inputs checked against the model (names, shapes, lossless datatype conversion)."""
    specs = model.input_specs
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
    if len(feeds) > 1:
        batches = {feeds[s.name].shape[0] for s in model.inputs if s.shape[:1] == (-1,)}
        if len(batches) > 1:
            raise BadRequest(f"inputs disagree on the batch size: {sorted(batches)}")
    return feeds


def select_outputs(model: LoadedModel, request: DecodedRequest) -> list[RequestedOutput]:
    """The outputs to return: those asked for (checked), else all of them."""
    if request.outputs is None:
        every = _EVERY_OUTPUT.get(model)
        if every is None:
            every = _EVERY_OUTPUT[model] = [RequestedOutput(n, None, 0) for n in model.output_names]
        return every
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


# Bodies (bytes) and outputs (elements) up to these sizes are handled on the event loop.
INLINE_BODY_BYTES = 64 * 1024
INLINE_OUTPUT_ELEMENTS = 16 * 1024

T = TypeVar("T")


async def _off_loop_if(large: bool, work: Callable[[], T]) -> T:
    return await asyncio.to_thread(work) if large else work()


def _parse_v2(
    model: LoadedModel, body: bytes, header_length: str | None
) -> tuple[DecodedRequest, dict[str, np.ndarray], list[RequestedOutput]]:
    request = decode_infer_request(body, header_length)
    return request, prepare_feeds(model, request.inputs), select_outputs(model, request)


def _encode_v2(
    model: LoadedModel,
    request: DecodedRequest,
    wanted: list[RequestedOutput],
    results: Outputs,
    request_id: str,
) -> EncodedResponse:
    outputs = []
    for w in wanted:
        binary = request.binary_output if w.binary is None else w.binary
        array = results[w.name]
        if w.classification:
            top = classify(array, w.classification, model.labels)
            outputs.append(OutputTensor(w.name, "BYTES", top, binary))
        else:
            outputs.append(OutputTensor(w.name, V2_DATATYPES[array.dtype], array, binary))
    return encode_infer_response(model.name, str(model.version), request.id or request_id, outputs)


def _output_elements(results: Outputs) -> int:
    total = 0
    for array in results.values():
        total += array.size
    return total


async def infer_v2(
    repository: ModelRepository,
    batchers: BatcherRegistry,
    record: RequestRecord,
    target: tuple[str, str | None],
    body: bytes,
    header_length: str | None,
    request_id: str,
    receive: Receive | None = None,
) -> EncodedResponse:
    """Answer one V2 infer request for ``target`` = (model name, version or None).

    ``receive`` (the request's ASGI receive, body already read) lets a client
    that disconnects take its queued request with it.
    """
    model = repository.get(*target)
    record.version = str(model.version)
    large = len(body) > INLINE_BODY_BYTES
    request, feeds, wanted = await _off_loop_if(
        large, lambda: _parse_v2(model, body, header_length)
    )
    batcher = batchers.batcher(model, repository.batching(model.name))
    timeout = request.timeout_us / 1e6 if request.timeout_us else batchers.timeout_s
    results = await batcher.run(
        model, feeds, [w.name for w in wanted], timeout_s=timeout, receive=receive
    )
    return await _off_loop_if(
        _output_elements(results) > INLINE_OUTPUT_ELEMENTS,
        lambda: _encode_v2(model, request, wanted, results, request_id),
    )


def _parse_v1(model: LoadedModel, name: str, body: bytes) -> np.ndarray:
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
    return array


def _encode_v1(model: LoadedModel, results: Outputs, samples: int) -> bytes:
    if len(results) == 1:
        predictions: object = next(iter(results.values()))
    else:
        predictions = [{n: results[n][i] for n in model.output_names} for i in range(samples)]
    return dump_json({"predictions": predictions}, results.values())


async def predict_v1(
    repository: ModelRepository,
    batchers: BatcherRegistry,
    record: RequestRecord,
    name: str,
    body: bytes,
    receive: Receive | None = None,
) -> bytes:
    """V1 ``{"instances": [...]}`` -> ``{"predictions": [...]}``: one instance per sample."""
    model = repository.get(name)
    record.version = str(model.version)
    large = len(body) > INLINE_BODY_BYTES
    array = await _off_loop_if(large, lambda: _parse_v1(model, name, body))
    spec = model.inputs[0]
    batcher = batchers.batcher(model, repository.batching(model.name))
    results = await batcher.run(
        model, {spec.name: array}, model.output_names, timeout_s=batchers.timeout_s, receive=receive
    )
    return await _off_loop_if(
        _output_elements(results) > INLINE_OUTPUT_ELEMENTS,
        lambda: _encode_v1(model, results, len(array)),
    )
