"""Model repository extension: index, load (rescan, hot swap) and unload, in every worker:
REST over the data plane (:mod:`service.dataplane.plane`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends
from pydantic import BaseModel

from service.protocol import LoadResult, RepositoryEntry, error_responses
from service.rest.routes.deps import DataPlaneDep, require_management

router = APIRouter(tags=["repository"])


@router.get("/v2/repository/index")
async def repository_index(dataplane: DataPlaneDep, ready: bool = False) -> list[RepositoryEntry]:
    """Every model version, its state (READY or UNAVAILABLE) and why; ready=true: READY only."""
    return dataplane.index(ready)


class IndexRequest(BaseModel):
    """Triton's repository index request body."""

    ready: bool = False


@router.post("/v2/repository/index", responses=error_responses(400, 413, 422))
async def repository_index_post(
    dataplane: DataPlaneDep, body: Annotated[IndexRequest | None, Body()] = None
) -> list[RepositoryEntry]:
    """The same index by POST, as Triton serves it: an optional JSON body ``{"ready": true}``
    (Triton's clients send it, or no body at all)."""
    return dataplane.index(body is not None and body.ready)


@router.post(
    "/v2/repository/models/{name}/load",
    dependencies=[Depends(require_management)],
    responses=error_responses(400, 401, 403, 404, 413, 503),
)
async def load_model(name: str, dataplane: DataPlaneDep) -> LoadResult:
    """Rescan the model's directory in every worker: new versions are validated and swapped
    in, failed ones retried.

    Answers once every worker process serves the same versions. 400 when a version failed
    validation or none is ready (the body lists each version's state and reason; versions
    that served keep serving); 503 when a worker did not follow in time.
    """
    return await dataplane.load(name)


@router.post(
    "/v2/repository/models/{name}/unload",
    dependencies=[Depends(require_management)],
    responses=error_responses(401, 403, 404, 413, 503),
)
async def unload_model(name: str, dataplane: DataPlaneDep) -> LoadResult:
    """Stop serving every version of the model, in every worker, until it is loaded again."""
    return await dataplane.unload(name)
