"""Open Inference Protocol (KServe V2) types: datatypes and the HTTP bodies.

Responses and metadata are pydantic models. Inference requests are decoded by
hand in :mod:`service.rest.codec` (big tensors must go straight to numpy), so the
request models here exist to document the API in OpenAPI only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from foldserve.model_format import KeptBatchNorm
from foldserve.onnx_fold.version import DerivedFrom

PLATFORM = "onnxruntime_onnx"
SERVER_EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]

ModelState = Literal["READY", "UNAVAILABLE"]


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in words a client can act on")


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks the dynamic batch axis")


class FoldReportSummary(BaseModel):
    folded: int = Field(description="BN layers folded into a neighbouring layer")
    kept: list[KeptBatchNorm] = Field(description="BN layers left in place, and why")


class ModelMetadata(BaseModel):
    """V2 model metadata plus FoldServe's fields (provider, BN counts, fold summary, labels)."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    version: str = Field(description="the version these details describe")
    provider: str = Field(description="ONNX Runtime execution provider actually used")
    variant: str = Field(
        description="the file that serves: 'folded' (model.onnx) or 'int8' (model.int8.onnx), "
        "as the model's config.json asks"
    )
    io_binding: bool
    bn_nodes: dict[str, int]
    fold_report: FoldReportSummary
    labels: list[str] = Field(description="class names: labels[i] names output column i")
    features: list[str] = Field(
        description="names of the input's columns in the order the model takes them "
        "(the training CSV's header without the label column); [] when not recorded"
    )
    derived_from: DerivedFrom | None = Field(
        None,
        description="set when the version was derived from a user's ONNX file (a bare "
        "model.onnx, or `import-onnx`): that file, its sha256 and the fold's own check",
    )


class ModelReady(BaseModel):
    name: str
    version: str | None
    ready: bool
    reason: str = ""


class RepositoryEntry(BaseModel):
    name: str
    version: str | None = None
    state: ModelState
    reason: str = ""


class LoadResult(BaseModel):
    name: str
    versions: list[RepositoryEntry]
    workers: int = Field(description="worker processes that now serve exactly these versions")


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: bytes of this tensor after the JSON header"
    )
    data: list[Any] | None = Field(None, description="row-major values, flat or nested")


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data: bool; classification: top-K as 'score:index:label'"
    )


class InferRequest(BaseModel):
    """Documentation of the V2 request body (decoded by hand at runtime)."""

    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_output: answer every output in binary"
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[ResponseOutput]


class PredictRequest(BaseModel):
    """V1 body: one entry of ``instances`` per sample of a single-input model."""

    instances: list[Any]


class PredictResponse(BaseModel):
    predictions: list[Any] = Field(description="per instance: the output row (e.g. logits)")
    labels: list[str] | None = Field(
        None,
        description="per instance: the label of its highest score (models with labels, "
        "one output of one score per label)",
    )


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error statuses a route can give."""
    return {code: {"model": ErrorResponse} for code in codes}


def _inline_refs(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.rsplit("/", 1)[1]], defs)
        return {k: _inline_refs(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline_refs(v, defs) for v in schema]
    return schema


def request_body_openapi(model: type[BaseModel], *, binary: bool = False) -> dict[str, Any]:
    """``openapi_extra`` documenting the body of a route that reads its body by hand."""
    schema = model.model_json_schema()
    content: dict[str, Any] = {
        "application/json": {"schema": _inline_refs(schema, schema.get("$defs", {}))}
    }
    if binary:
        content["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary"},
            "description": "binary tensor extension: a JSON header of "
            "Inference-Header-Content-Length bytes, then the raw little-endian tensors",
        }
    return {"requestBody": {"required": True, "content": content}}
