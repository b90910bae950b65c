"""``GET /v2/models/{name}/fold-latency``: folded against unfolded latency on the live runtime."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from foldserve.latency_stats import histogram_quantile
from service.fold_latency.lab import FoldLatencyLab
from service.fold_latency.measure import LatencyParams
from service.fold_latency.report import EndToEnd, FoldLatencyReport
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
) -> FoldLatencyReport:
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
        report = lab.last(name)
    else:
        model = repository.get(name, version)
        params = LatencyParams(batch_size, iterations, warmup, isolate, seed, int8=int8)
        report = await lab.measure(model, params)
    end_to_end, words = in_scale(repository, metrics, name, report)
    return report.model_copy(
        update={
            "cached": cached,
            "end_to_end": end_to_end,
            "scale": words,
            "samples_ms": report.samples_ms if samples else None,
        }
    )


def in_scale(
    repository: ModelRepository, metrics: ServiceMetrics, name: str, report: FoldLatencyReport
) -> tuple[EndToEnd | None, str]:
    """``end_to_end`` and ``scale`` for a report: the saving beside what this server's
    requests to the same version take, read from the metrics now."""
    label = repository.metric_label(name)
    buckets = metrics.request_buckets(label, report.model_version)
    p50 = histogram_quantile(0.5, buckets)
    requests = int(buckets[-1][1]) if buckets else 0
    p50_ms = None if p50 is None else p50 * 1e3
    e2e = None if p50_ms is None else EndToEnd(p50_ms=p50_ms, requests=requests)
    words = scale(report.saving_us_per_call, report.batch_size, p50_ms, requests)
    return e2e, words
