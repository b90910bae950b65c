"""Model repository extension: index, load (rescan, hot swap) and unload."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from service.errors import ModelNotReady
from service.protocol import LoadResult, RepositoryEntry, error_responses
from service.repository import ModelEntry
from service.routes.deps import RepositoryDep, require_api_key

router = APIRouter(tags=["repository"])


def index_entries(entry: ModelEntry) -> list[RepositoryEntry]:
    if not entry.versions:
        return [RepositoryEntry(name=entry.name, state="UNAVAILABLE", reason=entry.why_not_ready())]
    return [
        RepositoryEntry(name=entry.name, version=str(v), state=s.state, reason=s.reason)
        for v, s in sorted(entry.versions.items())
    ]


@router.get("/v2/repository/index")
@router.post("/v2/repository/index", include_in_schema=False)  # Triton clients POST here
async def repository_index(repository: RepositoryDep, ready: bool = False) -> list[RepositoryEntry]:
    """Every model version, its state (READY or UNAVAILABLE) and why; ready=true: READY only."""
    entries = [e for entry in repository.entries() for e in index_entries(entry)]
    return [e for e in entries if e.state == "READY"] if ready else entries


@router.post(
    "/v2/repository/models/{name}/load",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401, 404, 503),
)
async def load_model(name: str, repository: RepositoryDep) -> LoadResult:
    """Rescan the model's directory: new versions are validated and swapped in atomically.

    A version that fails validation never replaces one that serves; 503 when no
    version of the model is ready afterwards.
    """
    entry = await run_in_threadpool(repository.load, name)
    if entry.default() is None:
        raise ModelNotReady(f"model '{name}' has no ready version: {entry.why_not_ready()}")
    return LoadResult(name=name, versions=index_entries(entry))


@router.post(
    "/v2/repository/models/{name}/unload",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401, 404),
)
async def unload_model(name: str, repository: RepositoryDep) -> LoadResult:
    """Stop serving every version of the model until it is loaded again."""
    entry = await run_in_threadpool(repository.unload, name)
    return LoadResult(name=name, versions=index_entries(entry))
