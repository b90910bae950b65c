"""Model repository extension: index, load (rescan, hot swap) and unload, in every worker."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.errors import LoadFailed
from service.protocol import LoadResult, RepositoryEntry, error_responses
from service.repository import NOT_SELECTED, ModelEntry
from service.routes.deps import RepositoryDep, SyncDep, require_management

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


def _failures(entry: ModelEntry) -> list[str]:
    """Why versions of ``entry`` cannot serve (or cannot serve the variant its config.json
    asks for: a READY version with a reason), where that is a failure (not a policy)."""
    if not entry.versions:
        return [entry.why_not_ready()]
    return [
        f"version {v}: {s.reason}"
        for v, s in sorted(entry.versions.items())
        if s.reason and not s.reason.startswith(NOT_SELECTED)
    ]


@router.post(
    "/v2/repository/models/{name}/load",
    dependencies=[Depends(require_management)],
    responses=error_responses(400, 401, 403, 404, 503),
)
async def load_model(name: str, sync: SyncDep) -> LoadResult:
    """Rescan the model's directory in every worker: new versions are validated and swapped
    in, failed ones retried.

    Answers once every worker process serves the same versions. 400 when a version failed
    validation or none is ready (the body lists each version's state and reason; versions
    that served keep serving); 503 when a worker did not follow in time.
    """
    entry, states = await sync.change(name, "load")
    versions = index_entries(entry)
    failures = _failures(entry)
    if failures or entry.default() is None:
        raise LoadFailed(
            f"model '{name}' did not load cleanly: " + "; ".join(failures or ["no ready version"]),
            details={"name": name, "versions": [v.model_dump() for v in versions]},
        )
    return LoadResult(name=name, versions=versions, workers=len(states))


@router.post(
    "/v2/repository/models/{name}/unload",
    dependencies=[Depends(require_management)],
    responses=error_responses(401, 403, 404, 503),
)
async def unload_model(name: str, sync: SyncDep) -> LoadResult:
    """Stop serving every version of the model, in every worker, until it is loaded again."""
    entry, states = await sync.change(name, "unload")
    return LoadResult(name=name, versions=index_entries(entry), workers=len(states))
