"""``GET /v2/models/{name}/fold-latency``: folded against unfolded latency on the live runtime."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from service.latency import LatencyParams
from service.latency_lab import FoldLatencyLab
from service.protocol import error_responses
from service.routes.deps import RepositoryDep, require_api_key

# Bounds of the query parameters (422 outside). A measurement also stops timing after
# the lab's max_seconds, so a large batch on a slow model cannot hold it for long.
MAX_BATCH_SIZE = 256
MIN_ITERATIONS = 10
MAX_ITERATIONS = 10_000
MAX_WARMUP = 1_000

router = APIRouter(tags=["latency"])


class VariantLatency(BaseModel):
    file: str = Field(description="the ONNX file of this variant")
    bn_nodes: int = Field(description="BatchNormalization nodes counted in that file")
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    samples_per_s: float = Field(description="batch_size / mean latency")


class SpeedupInterval(BaseModel):
    ratio: float = Field(description="unfolded p50 / folded p50 (> 1: folding is faster)")
    ci95: tuple[float, float] = Field(description="95% bootstrap interval over paired runs")


class FoldLatencyResponse(BaseModel):
    model_name: str
    model_version: str
    measured_at: str = Field(description="UTC ISO-8601 time the measurement finished")
    cached: bool = Field(description="true: the last report, returned by cached=true")
    case: str = Field(description="'ort_default' (ORT optimizations on) or 'isolated' (off)")
    case_description: str
    isolate: bool
    graph_optimization_level: str
    provider: str = Field(description="execution provider the sessions really use")
    providers: list[str]
    threads: int
    batch_size: int
    iterations: int
    iterations_completed: int
    warmup: int
    seed: int
    seconds: float = Field(description="wall time of warm-up and timed runs")
    time_limited: bool = Field(description="timing stopped at the time limit before iterations")
    folded: VariantLatency
    unfolded: VariantLatency
    speedup: SpeedupInterval
    verdict: str
    max_abs_diff: float | None = Field(description="largest output difference (None: NaN/inf)")
    bn_nodes: dict[str, int]
    unfolded_bn_inputs: dict[str, int] = Field(
        description="op feeding each BatchNormalization node of the unfolded file"
    )
    unfolded_bn_nodes_after_ort: int | None = Field(
        description="BN nodes left in the unfolded graph after ORT's own optimizations"
    )
    machine: dict[str, Any]
    samples_ms: dict[str, list[float]] | None = Field(
        description="per-run latencies in ms, pair i = run i of each (samples=true)"
    )


async def get_lab(request: Request) -> FoldLatencyLab:
    lab: FoldLatencyLab = request.app.state.fold_latency
    return lab


@router.get(
    "/v2/models/{name}/fold-latency",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401, 404, 409, 422, 429, 503),
)
async def fold_latency(
    name: str,
    repository: RepositoryDep,
    lab: Annotated[FoldLatencyLab, Depends(get_lab)],
    version: str | None = None,
    batch_size: Annotated[int, Query(ge=1, le=MAX_BATCH_SIZE)] = 1,
    iterations: Annotated[int, Query(ge=MIN_ITERATIONS, le=MAX_ITERATIONS)] = 200,
    warmup: Annotated[int, Query(ge=0, le=MAX_WARMUP)] = 20,
    isolate: bool = False,
    seed: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    samples: bool = False,
    cached: bool = False,
) -> FoldLatencyResponse:
    """Time the folded and unfolded files of a version, interleaved, on the same runtime.

    ``isolate=true`` disables ORT's graph optimizations in both sessions (what folding
    itself buys); the default keeps them on (what a user gets). ``samples=true`` adds
    the per-run latencies. ``cached=true`` returns the model's last report without
    measuring (the measurement parameters are then ignored). One measurement runs at
    a time: 429 with Retry-After while one runs.
    """
    if cached:
        repository.entry(name)  # 404 for a model the repository does not have
        body = lab.last(name)
        if not samples:
            body["samples_ms"] = None
    else:
        model = repository.get(name, version)
        params = LatencyParams(batch_size, iterations, warmup, isolate, seed)
        body = (await lab.measure(model, params)).to_dict(samples=samples)
    return FoldLatencyResponse.model_validate({**body, "cached": cached})
