"""Route dependencies: the app's repository, metrics and settings, and the API-key guard.

They are ``async`` on purpose: FastAPI runs plain ``def`` dependencies in a worker
thread, a thread hop per dependency per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.auth import check_api_key, check_management, presented_key
from service.dataplane.plane import DataPlane
from service.models.repository import ModelRepository
from service.observability.metrics import ServiceMetrics
from service.settings import Settings


async def get_repository(request: Request) -> ModelRepository:
    repository: ModelRepository = request.app.state.repository
    return repository


async def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


async def get_dataplane(request: Request) -> DataPlane:
    dataplane: DataPlane = request.app.state.dataplane
    return dataplane


async def app_settings(request: Request) -> Settings:
    """The app's settings (not :func:`service.settings.get_settings`, the environment's)."""
    settings: Settings = request.app.state.settings
    return settings


RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
SettingsDep = Annotated[Settings, Depends(app_settings)]
DataPlaneDep = Annotated[DataPlane, Depends(get_dataplane)]


HOW = "'Authorization: Bearer KEY' or 'X-API-Key: KEY'"


def _presented(request: Request) -> str | None:
    headers = request.headers
    return presented_key(headers.get("authorization"), headers.get("x-api-key"))


async def require_management(request: Request, settings: SettingsDep) -> None:
    """Repository management: 403 when it is off (no key on a non-loopback listener),
    else 401 unless the API key came."""
    check_management(settings, _presented(request), "this route", HOW)


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """401 unless the configured API key (if any) came as a Bearer token or X-API-Key."""
    check_api_key(settings, _presented(request), "this route", HOW)
