"""Server and model metadata, model readiness (V2), and the V1 model status: REST over the
data plane (:mod:`service.dataplane.plane`)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.dataplane.plane import DataPlane
from service.protocol import (
    SERVER_EXTENSIONS,
    ModelMetadata,
    ModelReady,
    ServerMetadata,
    error_responses,
)
from service.rest.routes.deps import DataPlaneDep

router = APIRouter(tags=["models"])

# Answers of a route that resolves a model: unknown (404), not servable (400: unloaded,
# failed, excluded by its version policy), the repository still loading (503).
MODEL_ERRORS = error_responses(400, 404, 503)


def server_version() -> str:
    try:
        return package_version("foldserve")
    except PackageNotFoundError:
        return "0.0.0"


@router.get("/v2")
async def server_metadata() -> ServerMetadata:
    """Server name, version and the protocol extensions it supports."""
    return ServerMetadata(name="foldserve", version=server_version(), extensions=SERVER_EXTENSIONS)


@router.get("/v2/models/stats", responses=error_responses(503))
async def all_model_stats(dataplane: DataPlaneDep) -> dict[str, Any]:
    """Triton's statistics extension: every ready version, summed over all workers.

    Durations are cumulative nanoseconds; ``compute_infer`` counts each request's whole
    ONNX Runtime call (a batched call once per request in it)."""
    return dataplane.statistics()


@router.get("/v2/models/{name}", responses=MODEL_ERRORS)
async def model_metadata(name: str, dataplane: DataPlaneDep) -> ModelMetadata:
    """Metadata of the version an unversioned request is served by (the highest ready one)."""
    return dataplane.metadata(name)


@router.get("/v2/models/{name}/versions/{version}", responses=MODEL_ERRORS)
async def model_version_metadata(name: str, version: str, dataplane: DataPlaneDep) -> ModelMetadata:
    return dataplane.metadata(name, version)


def readiness(dataplane: DataPlane, name: str, version: str | None) -> JSONResponse:
    body = dataplane.model_ready(name, version)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 400)


READY_DOCS: dict[str, Any] = {
    "response_model": ModelReady,
    "responses": {
        400: {"model": ModelReady, "description": "not ready: the body says why"},
        **error_responses(404, 503),
    },
}


@router.get("/v2/models/{name}/ready", **READY_DOCS)
async def model_ready(name: str, dataplane: DataPlaneDep) -> JSONResponse:
    """200 with ready=true when the model can serve; 400 with ready=false and the reason
    when it cannot (unloaded, failed to load); 503 while the repository is still loading."""
    return readiness(dataplane, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", **READY_DOCS)
async def model_version_ready(name: str, version: str, dataplane: DataPlaneDep) -> JSONResponse:
    return readiness(dataplane, name, version)


@router.get("/v1/models/{name}", **READY_DOCS)
async def v1_model_status(name: str, dataplane: DataPlaneDep) -> JSONResponse:
    """KServe V1 model status."""
    return readiness(dataplane, name, None)


@router.get("/v2/models/{name}/config", responses=MODEL_ERRORS)
async def model_config(name: str, dataplane: DataPlaneDep) -> dict[str, Any]:
    """Triton's model configuration of the version an unversioned request gets."""
    return dataplane.config(name)


@router.get("/v2/models/{name}/versions/{version}/config", responses=MODEL_ERRORS)
async def model_version_config(name: str, version: str, dataplane: DataPlaneDep) -> dict[str, Any]:
    """Triton's model configuration of one version."""
    return dataplane.config(name, version)


@router.get("/v2/models/{name}/stats", responses=error_responses(404, 503))
async def model_stats(name: str, dataplane: DataPlaneDep) -> dict[str, Any]:
    """Triton's statistics extension: the model's ready versions, summed over all workers."""
    return dataplane.statistics(name)


@router.get("/v2/models/{name}/versions/{version}/stats", responses=error_responses(404, 503))
async def model_version_stats(name: str, version: str, dataplane: DataPlaneDep) -> dict[str, Any]:
    """Triton's statistics extension for one version."""
    return dataplane.statistics(name, version)
