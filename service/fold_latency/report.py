"""The fold-latency report: one model, filled by the measurement, kept by the lab, returned
by ``GET /v2/models/{name}/fold-latency`` (see ``docs/latency.md``).

:func:`service.fold_latency.measure.measure_model` fills everything it measures
(``cached`` false, ``end_to_end`` null and ``scale`` empty); the route sets those three
from this server's metrics at answer time, and drops ``samples_ms`` unless asked.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, Field

from foldserve.latency_stats import LatencySummary, Speedup
from service.fold_latency.words import bound_words


class VariantLatency(BaseModel):
    file: str = Field(description="the ONNX file of this variant")
    bn_nodes: int = Field(description="BatchNormalization nodes counted in that file")
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    samples_per_s: float = Field(description="batch_size / p50 latency")

    @classmethod
    def of(cls, file: str, bn_nodes: int, latency: LatencySummary) -> VariantLatency:
        return cls(file=file, bn_nodes=bn_nodes, **latency.to_dict())


class SpeedupInterval(BaseModel):
    ratio: float = Field(description="unfolded p50 / folded p50 (> 1: folding is faster)")
    ci95: tuple[float, float] = Field(description="95% bootstrap interval over paired runs")

    @classmethod
    def of(cls, speedup: Speedup) -> Self:
        return cls(ratio=speedup.ratio, ci95=(speedup.ci_low, speedup.ci_high))


class Int8Speedup(SpeedupInterval):
    ratio: float = Field(description="folded p50 / int8 p50 (> 1: INT8 is faster)")


class FoldBound(BaseModel):
    bn_share: float | None = Field(
        description="BatchNormalization kernels' share of the unfolded model's kernel time "
        "(ONNX Runtime's profiler, same optimization level; null: no kernel times)"
    )
    max_speedup: float | None = Field(
        description="1 / (1 - bn_share): the most folding can buy, all BN work removed"
    )
    description: str

    @classmethod
    def of(cls, share: float | None, isolate: bool) -> FoldBound:
        """The bound of a BN kernel-time ``share`` (None: the profiler gave none)."""
        top = None if share is None or share >= 1 else 1 / (1 - share)
        return cls(bn_share=share, max_speedup=top, description=bound_words(share, isolate))


class EndToEnd(BaseModel):
    p50_ms: float = Field(
        description="p50 of the answered (200) inference requests, first byte read to "
        "response built, estimated from the request-duration histogram (all workers)"
    )
    requests: int = Field(description="answered requests the p50 is over")


class FoldLatencyReport(BaseModel):
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
        "(null: no answered request in the metrics yet)",
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
