"""Liveness and readiness (V2 health routes, used as Kubernetes probes)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.protocol import LiveResponse, ReadyResponse
from service.rest.routes.deps import DataPlaneDep

router = APIRouter(tags=["health"])


@router.get("/v2/health/live")
async def live() -> LiveResponse:
    """The process answers HTTP."""
    return LiveResponse(live=True)


@router.get("/v2/health/ready", responses={503: {"model": ReadyResponse}})
async def ready(dataplane: DataPlaneDep, response: Response) -> ReadyResponse:
    """True once the repository's first scan has loaded (or skipped) every model; 503 before,
    and again from SIGTERM on (the drain period: send no more traffic here)."""
    is_ready = dataplane.server_ready()
    if not is_ready:
        response.status_code = 503
    return ReadyResponse(ready=is_ready)
