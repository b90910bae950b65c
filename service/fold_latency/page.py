"""``GET /ui``: a page of the models and their folded-vs-unfolded latency.

The page and its script and style are files under ``service/fold_latency/static/``; the
script draws its chart itself (SVG) from this server's own API, so the page
fetches nothing from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent / "static"

router = APIRouter(tags=["ui"], include_in_schema=False)


@router.get("/ui")
async def ui_page() -> FileResponse:
    return FileResponse(STATIC / "ui.html", media_type="text/html; charset=utf-8")


@router.get("/ui/ui.js")
async def ui_script() -> FileResponse:
    return FileResponse(STATIC / "ui.js", media_type="text/javascript; charset=utf-8")


@router.get("/ui/ui.css")
async def ui_style() -> FileResponse:
    return FileResponse(STATIC / "ui.css", media_type="text/css; charset=utf-8")
