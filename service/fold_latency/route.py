"""``GET /v2/models/{name}/fold-latency``: folded against unfolded latency on the live runtime."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from foldserve.latency_stats import histogram_quantile
from service.fold_latency.lab import FoldLatencyLab
from service.fold_latency.measure import LatencyParams
from service.fold_latency.words import scale
from service.models.repository import ModelRepository
from service.observability.metrics import ServiceMetrics
from service.protocol import error_responses
from service.rest.routes.deps import MetricsDep, RepositoryDep, require_api_key

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
    samples_per_s: float = Field(description="batch_size / p50 latency")


class SpeedupInterval(BaseModel):
    ratio: float = Field(description="unfolded p50 / folded p50 (> 1: folding is faster)")
    ci95: tuple[float, float] = Field(description="95% bootstrap interval over paired runs")


class Int8Speedup(BaseModel):
    ratio: float = Field(description="folded p50 / int8 p50 (> 1: INT8 is faster)")
    ci95: tuple[float, float] = Field(description="95% bootstrap interval over paired runs")


class FoldBound(BaseModel):
    bn_share: float | None = Field(
        description="BatchNormalization kernels' share of the unfolded model's kernel time "
        "(ONNX Runtime's profiler, same optimization level; null: no kernel times)"
    )
    max_speedup: float | None = Field(
        description="1 / (1 - bn_share): the most folding can buy, all BN work removed"
    )
    description: str


class EndToEnd(BaseModel):
    p50_ms: float = Field(
        description="p50 of the answered (200) inference requests, first byte read to "
        "response built, estimated from the request-duration histogram (all workers)"
    )
    requests: int = Field(description="answered requests the p50 is over")


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
    bound: FoldBound | None = Field(
        None, description="the speedup folding can reach on this model, beside the measured one"
    )
    int8: VariantLatency | None = Field(
        None, description="model.int8.onnx, timed interleaved with the other two (int8=true)"
    )
    int8_speedup: Int8Speedup | None = Field(None, description="INT8 against folded FP32")
    int8_verdict: str | None = None
    int8_max_abs_diff: float | None = Field(
        None, description="largest INT8 vs folded FP32 output difference on these inputs"
    )
    saving_us_per_call: float = Field(
        description="unfolded p50 - folded p50 per session.run call, microseconds"
    )
    saving_us_per_sample: float = Field(description="saving_us_per_call / batch_size")
    scope: str = Field(description="what these times include: ONNX Runtime only")
    end_to_end: EndToEnd | None = Field(
        description="this server's measured request latency for the same model version "
        "(null: no answered request in the metrics yet)"
    )
    scale: str = Field(description="the saving in words, beside the end-to-end p50")
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
    responses=error_responses(400, 401, 404, 409, 422, 429, 503),
)
async def fold_latency(
    name: str,
    repository: RepositoryDep,
    lab: Annotated[FoldLatencyLab, Depends(get_lab)],
    metrics: MetricsDep,
    version: str | None = None,
    batch_size: Annotated[int, Query(ge=1, le=MAX_BATCH_SIZE)] = 1,
    iterations: Annotated[int, Query(ge=MIN_ITERATIONS, le=MAX_ITERATIONS)] = 200,
    warmup: Annotated[int, Query(ge=0, le=MAX_WARMUP)] = 20,
    isolate: bool = False,
    seed: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    samples: bool = False,
    cached: bool = False,
    int8: bool = False,
) -> FoldLatencyResponse:
    """Time the folded and unfolded files of a version, interleaved, on the same runtime.

    ``isolate=true`` disables ORT's graph optimizations in both sessions (what folding
    itself buys); the default keeps them on (what a user gets). ``samples=true`` adds
    the per-run latencies. ``int8=true`` also times the version's ``model.int8.onnx``
    (409 when it has none) and adds ``int8`` and ``int8_speedup`` (against folded
    FP32). ``cached=true`` returns the model's last report without measuring (the
    measurement parameters are then ignored). One measurement runs at a time: 429
    with Retry-After while one runs.
    """
    if cached:
        repository.entry(name)  # 404 for a model the repository does not have
        body = lab.last(name)
        if not samples:
            body["samples_ms"] = None
    else:
        model = repository.get(name, version)
        params = LatencyParams(batch_size, iterations, warmup, isolate, seed, int8=int8)
        body = (await lab.measure(model, params)).to_dict(samples=samples)
    body.update(in_scale(repository, metrics, name, body))
    return FoldLatencyResponse.model_validate({**body, "cached": cached})


def in_scale(
    repository: ModelRepository, metrics: ServiceMetrics, name: str, body: dict[str, Any]
) -> dict[str, Any]:
    """``end_to_end`` and ``scale`` for a report: the saving beside what this server's
    requests to the same version take, read from the metrics now."""
    label = repository.metric_label(name)
    buckets = metrics.request_buckets(label, body["model_version"])
    p50 = histogram_quantile(0.5, buckets)
    requests = int(buckets[-1][1]) if buckets else 0
    e2e = None if p50 is None else {"p50_ms": p50 * 1e3, "requests": requests}
    p50_ms = None if p50 is None else p50 * 1e3
    words = scale(body["saving_us_per_call"], body["batch_size"], p50_ms, requests)
    return {"end_to_end": e2e, "scale": words}
