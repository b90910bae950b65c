"""Inference routes: V2 infer (JSON and binary tensors) and V1 predict."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service.inference import infer_v2, predict_v1
from service.middleware import read_body, request_id
from service.protocol import (
    InferRequest,
    InferResponse,
    PredictRequest,
    PredictResponse,
    error_responses,
    request_body_openapi,
)
from service.routes.deps import MetricsDep, RepositoryDep, SettingsDep

router = APIRouter(tags=["inference"])

INFER_DOCS = {
    "response_model": InferResponse,
    "responses": error_responses(400, 404, 413, 415, 503),
    "openapi_extra": request_body_openapi(InferRequest, binary=True),
}
HEADER_LENGTH = "inference-header-content-length"


async def _infer(
    request: Request,
    repository: RepositoryDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    target: tuple[str, str | None],
) -> Response:
    with metrics.track_request(repository.metric_label(target[0])) as record:
        body = await read_body(request, settings.max_request_bytes)
        encoded = await run_in_threadpool(
            infer_v2,
            repository,
            metrics,
            record,
            target,
            body,
            request.headers.get(HEADER_LENGTH),
            request_id(request),
        )
    if encoded.header_length is None:
        return Response(encoded.body, media_type="application/json")
    return Response(
        encoded.body,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(encoded.header_length)},
    )


@router.post("/v2/models/{name}/infer", **INFER_DOCS)  # type: ignore[arg-type]
async def infer(
    name: str,
    request: Request,
    repository: RepositoryDep,
    metrics: MetricsDep,
    settings: SettingsDep,
) -> Response:
    """Run the highest ready version (JSON, or binary tensors after a JSON header)."""
    return await _infer(request, repository, metrics, settings, (name, None))


@router.post("/v2/models/{name}/versions/{version}/infer", **INFER_DOCS)  # type: ignore[arg-type]
async def infer_version(
    name: str,
    version: str,
    request: Request,
    repository: RepositoryDep,
    metrics: MetricsDep,
    settings: SettingsDep,
) -> Response:
    """Run one specific version."""
    return await _infer(request, repository, metrics, settings, (name, version))


@router.post(
    "/v1/models/{name}:predict",
    response_model=PredictResponse,
    responses=error_responses(400, 404, 413, 415, 503),
    openapi_extra=request_body_openapi(PredictRequest),
)
async def predict(
    name: str,
    request: Request,
    repository: RepositoryDep,
    metrics: MetricsDep,
    settings: SettingsDep,
) -> Response:
    """V1: ``{"instances": [...]}``, one entry per sample, for single-input models."""
    with metrics.track_request(repository.metric_label(name)) as record:
        body = await read_body(request, settings.max_request_bytes)
        answer = await run_in_threadpool(predict_v1, repository, metrics, record, name, body)
    return Response(answer, media_type="application/json")
