"""Server and model metadata, model readiness (V2), and the V1 model status."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service import statistics
from service.metrics import ServiceMetrics
from service.onnx_fold.version import derived_from
from service.protocol import (
    PLATFORM,
    SERVER_EXTENSIONS,
    FoldReportSummary,
    ModelMetadata,
    ModelReady,
    ServerMetadata,
    TensorMetadata,
    error_responses,
)
from service.repository import ModelRepository
from service.routes.deps import MetricsDep, RepositoryDep

router = APIRouter(tags=["models"])


def server_version() -> str:
    try:
        return package_version("foldserve")
    except PackageNotFoundError:
        return "0.0.0"


@router.get("/v2")
async def server_metadata() -> ServerMetadata:
    """Server name, version and the protocol extensions it supports."""
    return ServerMetadata(name="foldserve", version=server_version(), extensions=SERVER_EXTENSIONS)


def describe(repository: ModelRepository, name: str, version: str | None) -> ModelMetadata:
    model = repository.get(name, version)
    entry = repository.entry(name)
    meta = model.metadata
    return ModelMetadata(
        name=name,
        versions=[str(v) for v in entry.ready_versions()],
        platform=PLATFORM,
        inputs=[
            TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape))
            for s in model.inputs
        ],
        outputs=[
            TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape))
            for s in model.outputs
        ],
        version=str(model.version),
        provider=model.provider,
        variant=model.variant,
        io_binding=model.io_binding,
        bn_nodes=meta.bn_nodes,
        fold_report=FoldReportSummary(
            folded=len(meta.fold_report.folded),
            kept=meta.fold_report.kept,
        ),
        labels=model.labels,
        derived_from=derived_from(meta),
        features=meta.features,
    )


@router.get("/v2/models/stats")
async def all_model_stats(repository: RepositoryDep, metrics: MetricsDep) -> dict[str, Any]:
    """Triton's statistics extension: every ready version, summed over all workers.

    Durations are cumulative nanoseconds; ``compute_infer`` counts each request's whole
    ONNX Runtime call (a batched call once per request in it)."""
    return stats_body(repository, metrics, None, None)


@router.get("/v2/models/{name}", responses=error_responses(404, 503))
async def model_metadata(name: str, repository: RepositoryDep) -> ModelMetadata:
    """Metadata of the version an unversioned request is served by (the highest ready one)."""
    return describe(repository, name, None)


@router.get("/v2/models/{name}/versions/{version}", responses=error_responses(404, 503))
async def model_version_metadata(
    name: str, version: str, repository: RepositoryDep
) -> ModelMetadata:
    return describe(repository, name, version)


def readiness(repository: ModelRepository, name: str, version: str | None) -> JSONResponse:
    entry, status = repository.resolve(name, version)
    if status is not None and status.model is not None:
        body = ModelReady(name=name, version=str(status.version), ready=True)
    else:
        reason = status.reason if status is not None else entry.why_not_ready()
        body = ModelReady(name=name, version=version, ready=False, reason=reason)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/v2/models/{name}/ready", response_model=ModelReady, responses=error_responses(404))
async def model_ready(name: str, repository: RepositoryDep) -> JSONResponse:
    """200 with ready=true when the model can serve, 503 with the reason when it cannot."""
    return readiness(repository, name, None)


@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    response_model=ModelReady,
    responses=error_responses(404),
)
async def model_version_ready(name: str, version: str, repository: RepositoryDep) -> JSONResponse:
    return readiness(repository, name, version)


@router.get("/v1/models/{name}", response_model=ModelReady, responses=error_responses(404))
async def v1_model_status(name: str, repository: RepositoryDep) -> JSONResponse:
    """KServe V1 model status."""
    return readiness(repository, name, None)


@router.get("/v2/models/{name}/config", responses=error_responses(404, 503))
async def model_config(name: str, repository: RepositoryDep) -> dict[str, Any]:
    """Triton's model configuration of the version an unversioned request gets."""
    return statistics.model_config(repository.get(name), repository.entry(name).config.policy)


@router.get("/v2/models/{name}/versions/{version}/config", responses=error_responses(404, 503))
async def model_version_config(
    name: str, version: str, repository: RepositoryDep
) -> dict[str, Any]:
    """Triton's model configuration of one version."""
    served = repository.get(name, version)
    return statistics.model_config(served, repository.entry(name).config.policy)


def stats_body(
    repository: ModelRepository, metrics: ServiceMetrics, name: str | None, version: str | None
) -> dict[str, Any]:
    """Statistics of every ready version of ``name`` (or of every model), or of ``version``."""
    if version is not None:
        assert name is not None
        repository.resolve(name, version)  # 404 for an unknown model or version
        keys = [(name, str(int(version)))]
    else:
        entries = [repository.entry(name)] if name is not None else repository.entries()
        keys = [(e.name, str(v)) for e in entries for v in e.ready_versions()]
    return statistics.model_statistics(metrics.collect_registry(), keys)


@router.get("/v2/models/{name}/stats", responses=error_responses(404))
async def model_stats(name: str, repository: RepositoryDep, metrics: MetricsDep) -> dict[str, Any]:
    """Triton's statistics extension: the model's ready versions, summed over all workers."""
    return stats_body(repository, metrics, name, None)


@router.get("/v2/models/{name}/versions/{version}/stats", responses=error_responses(404))
async def model_version_stats(
    name: str, version: str, repository: RepositoryDep, metrics: MetricsDep
) -> dict[str, Any]:
    """Triton's statistics extension for one version."""
    return stats_body(repository, metrics, name, version)
