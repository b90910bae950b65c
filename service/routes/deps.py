"""Route dependencies: the app's repository, metrics and settings, and the API-key guard.

They are ``async`` on purpose: FastAPI runs plain ``def`` dependencies in a worker
thread, a thread hop per dependency per request.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from service.dataplane import DataPlane
from service.errors import Forbidden, Unauthorized
from service.metrics import ServiceMetrics
from service.repository import ModelRepository
from service.settings import Settings, management_policy


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


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


async def require_management(request: Request, settings: SettingsDep) -> None:
    """Repository management: 403 when it is off (no key on a non-loopback listener),
    else the API key check."""
    refused = management_policy(settings)
    if refused is not None:
        raise Forbidden(refused)
    await require_api_key(request, settings)


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """401 unless the configured API key (if any) came as a Bearer token or X-API-Key."""
    if settings.api_key is None:
        return
    presented = _presented_key(request)
    if presented is None:
        raise Unauthorized(
            "this route needs the API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
        )
    if not secrets.compare_digest(presented.encode(), settings.api_key.get_secret_value().encode()):
        raise Unauthorized("the API key is wrong")
