"""Inference routes: V2 infer (JSON and binary tensors) and V1 predict.

The routes below are what OpenAPI documents. At run time
:class:`InferenceLane` answers the same paths first, with the same functions:
FastAPI's routing and per-request dependency solving cost more than decoding,
batching and encoding a small model's request together (on a 2-CPU machine,
~90 us of a ~120 us budget), and these paths need neither (their parameters
are path strings, their bodies are read by hand).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.batching import BatcherRegistry
from service.errors import ServiceError, error_response
from service.inference import infer_v2, predict_v1
from service.metrics import ServiceMetrics
from service.middleware import read_body, request_id
from service.protocol import (
    InferRequest,
    InferResponse,
    PredictRequest,
    PredictResponse,
    error_responses,
    request_body_openapi,
)
from service.repository import ModelRepository
from service.settings import Settings

router = APIRouter(tags=["inference"])

INFER_DOCS = {
    "response_model": InferResponse,
    "responses": error_responses(400, 404, 413, 415, 503, 504),
    "openapi_extra": request_body_openapi(InferRequest, binary=True),
}
HEADER_LENGTH = b"inference-header-content-length"
JSON = b"application/json"
BINARY = b"application/octet-stream"

# An answer: the body, its media type, and the Inference-Header-Content-Length (binary only).
Answer = tuple[bytes, bytes, int | None]


async def answer_v2(request: Request, target: tuple[str, str | None]) -> Answer:
    """A V2 infer request for ``target`` = (model name, version or None), answered."""
    state = request.app.state
    repository: ModelRepository = state.repository
    metrics: ServiceMetrics = state.metrics
    settings: Settings = state.settings
    batchers: BatcherRegistry = state.batchers
    with metrics.track_request(repository.metric_label(target[0])) as record:
        body = await read_body(request, settings.max_request_bytes)
        encoded = await infer_v2(
            repository,
            batchers,
            record,
            target,
            body,
            _header(request.scope, HEADER_LENGTH),
            request_id(request),
            request.receive,
        )
    if encoded.header_length is None:
        return encoded.body, JSON, None
    return encoded.body, BINARY, encoded.header_length


async def answer_v1(request: Request, name: str) -> Answer:
    """A V1 predict request for model ``name``, answered."""
    state = request.app.state
    repository: ModelRepository = state.repository
    metrics: ServiceMetrics = state.metrics
    settings: Settings = state.settings
    with metrics.track_request(repository.metric_label(name)) as record:
        body = await read_body(request, settings.max_request_bytes)
        answer = await predict_v1(repository, state.batchers, record, name, body, request.receive)
    return answer, JSON, None


def _header(scope: Scope, name: bytes) -> str | None:
    # The raw header list, not request.headers: cheaper, and this runs per request.
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _response(answer: Answer) -> Response:
    body, media_type, header_length = answer
    headers = (
        None if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    )
    return Response(body, media_type=media_type.decode(), headers=headers)


@router.post("/v2/models/{name}/infer", **INFER_DOCS)  # type: ignore[arg-type]
async def infer(request: Request, name: str) -> Response:
    """Run the highest ready version (JSON, or binary tensors after a JSON header)."""
    return _response(await answer_v2(request, (name, None)))


@router.post("/v2/models/{name}/versions/{version}/infer", **INFER_DOCS)  # type: ignore[arg-type]
async def infer_version(request: Request, name: str, version: str) -> Response:
    """Run one specific version."""
    return _response(await answer_v2(request, (name, version)))


@router.post(
    "/v1/models/{name}:predict",
    response_model=PredictResponse,
    responses=error_responses(400, 404, 413, 415, 503, 504),
    openapi_extra=request_body_openapi(PredictRequest),
)
async def predict(request: Request, name: str) -> Response:
    """V1: ``{"instances": [...]}``, one entry per sample, for single-input models."""
    return _response(await answer_v1(request, name))


def inference_path(path: str) -> tuple[str, str | None, bool] | None:
    """(model name, version or None, V1?) when ``path`` is one of the routes above, else None.

    Matches as the routes' patterns do: each ``{...}`` is one non-empty path segment.
    """
    parts = path.split("/")
    if len(parts) < 4 or parts[0] != "" or parts[2] != "models" or not parts[3]:
        return None
    if parts[1] == "v2":
        if len(parts) == 5 and parts[4] == "infer":
            return parts[3], None, False
        if len(parts) == 7 and parts[4] == "versions" and parts[5] and parts[6] == "infer":
            return parts[3], parts[5], False
    elif parts[1] == "v1" and len(parts) == 4 and parts[3].endswith(":predict"):
        name = parts[3][: -len(":predict")]
        return (name, None, True) if name else None
    return None


class InferenceLane:
    """ASGI middleware that answers ``POST`` to the inference paths before FastAPI routes them.

    It sits inside the request middleware (request id, size limit, access log)
    and maps :class:`ServiceError` exactly as the app's handler does; any other
    exception goes on to the app's 500 handler. Every other request passes
    through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = None
        if scope["type"] == "http" and scope["method"] == "POST":
            target = inference_path(scope["path"])
        if target is None:
            await self.app(scope, receive, send)
            return
        name, version, v1 = target
        request = Request(scope, receive)
        try:
            if v1:
                body, media_type, header_length = await answer_v1(request, name)
            else:
                body, media_type, header_length = await answer_v2(request, (name, version))
        except ServiceError as err:
            await error_response(err.status_code, err.message, err.headers)(scope, receive, send)
            return
        headers = [(b"content-type", media_type), (b"content-length", b"%d" % len(body))]
        if header_length is not None:
            headers.append((b"inference-header-content-length", b"%d" % header_length))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
