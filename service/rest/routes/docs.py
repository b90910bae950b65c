"""Offline API docs (Swagger UI 5 from the fastapi_offline package), the index, metrics."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.rest.routes.deps import MetricsDep

SWAGGER_STATIC = "/static/swagger-ui"
# fastapi_offline ships Swagger UI 5 (which reads the OpenAPI 3.1 FastAPI writes) in its
# static/ folder. Only the assets are used: create_app builds its own FastAPI, and /docs is here.
SWAGGER_ASSETS = Path(str(files("fastapi_offline") / "static"))

router = APIRouter()


@router.get("/", tags=["docs"])
async def index(request: Request) -> dict[str, Any]:
    """Where to go next."""
    return {
        "name": "foldserve",
        "links": {
            "docs": "/docs",
            "ui": "/ui",
            "openapi": request.app.openapi_url,
            "server_metadata": "/v2",
            "live": "/v2/health/live",
            "ready": "/v2/health/ready",
            "repository_index": "/v2/repository/index",
            "metrics": "/metrics",
        },
    }


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=str(request.app.openapi_url),
        title="FoldServe API",
        swagger_js_url=f"{SWAGGER_STATIC}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER_STATIC}/favicon.png",
    )


@router.get("/metrics", tags=["metrics"], response_class=Response)
async def metrics(service_metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(service_metrics.render(), media_type=CONTENT_TYPE_LATEST)
