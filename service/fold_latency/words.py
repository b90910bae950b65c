"""The fold-latency report in words: the case measured, the verdicts, the saving's scale,
and the bound folding can reach (:mod:`service.fold_latency.measure` measures)."""

from __future__ import annotations

from foldserve.latency_stats import Speedup

# The ops after which ONNX Runtime fuses a BatchNormalization node by itself (ConvBNFusion).
ORT_FUSES_AFTER = frozenset({"Conv"})


def describe_case(isolate: bool, bn_inputs: dict[str, int], after_ort: int | None) -> str:
    """The measured case in words: what the numbers mean and what to expect."""
    fusable = sum(n for op, n in bn_inputs.items() if op in ORT_FUSES_AFTER)
    other = sum(bn_inputs.values()) - fusable
    if isolate:
        return (
            "ONNX Runtime graph optimizations disabled (ORT_DISABLE_ALL) in both sessions: "
            f"all {fusable + other} BatchNormalization nodes of the unfolded file run as "
            "written, so this isolates what folding itself buys."
        )
    left = "" if after_ort is None else f" After ORT's optimization {after_ort} remain."
    return (
        "ONNX Runtime graph optimizations on (ORT_ENABLE_ALL), as served: what a user gets. "
        "ORT fuses Conv+BatchNormalization by itself but not Gemm+BatchNormalization "
        f"(Linear followed by BatchNorm1d). The unfolded file has {fusable} BN node(s) after "
        f"a Conv, which ORT folds on its own, and {other} elsewhere, which it does not.{left} "
        "Folding pays here only for the ones ORT leaves."
    )


RUNTIME_ONLY = (
    "These times are ONNX Runtime's session.run alone: a request to the server also spends "
    "time on HTTP, JSON, batching and queueing, which folding does not change."
)


def scale(saving_us: float, batch_size: int, e2e_p50_ms: float | None, requests: int) -> str:
    """The saving in absolute terms, set beside the server's own end-to-end request p50."""
    faster = "faster" if saving_us >= 0 else "slower"
    text = (
        f"The folded model runs {abs(saving_us):.2f} us {faster} per call of {batch_size} "
        f"sample(s) ({abs(saving_us) / batch_size:.2f} us per sample) in ONNX Runtime."
    )
    if e2e_p50_ms is None or e2e_p50_ms <= 0:
        return text + " No answered requests to this version are in the metrics yet."
    share = saving_us / (e2e_p50_ms * 1e3) * 100
    return (
        f"{text} This server's {requests} answered request(s) to this version took "
        f"{e2e_p50_ms:.3f} ms end to end at p50 (from the request-duration histogram), so "
        f"that is {share:.2g}% of a request."
    )


def _verdict(speedup: Speedup, faster: str, slower: str, unresolved: str) -> str:
    """The speedup in words: ``faster`` (e.g. "folded is {r} as fast as unfolded") when its
    interval lies above 1, ``slower`` below 1, else ``unresolved``."""
    ratio, low, high = speedup.ratio, speedup.ci_low, speedup.ci_high
    interval = f"(95% CI {low:.3f}-{high:.3f})"
    if low > 1.0:
        return f"{faster.format(ratio=f'{ratio:.2f}x')} {interval}"
    if high < 1.0:
        return f"{slower}: {ratio:.2f}x {interval}"
    return f"{unresolved}: {ratio:.2f}x {interval} includes 1"


def verdict(speedup: Speedup) -> str:
    return _verdict(
        speedup,
        "folded is {ratio} as fast as unfolded",
        "folded is slower",
        "no difference resolved",
    )


def int8_verdict(speedup: Speedup) -> str:
    """INT8 against the folded FP32 model, in words (ratio: folded p50 / int8 p50)."""
    return _verdict(
        speedup,
        "int8 is {ratio} as fast as folded FP32",
        "int8 is slower than folded FP32",
        "no INT8 difference resolved",
    )


def bound_words(share: float | None, isolate: bool) -> str:
    """The most folding can buy: removing every BN kernel of the unfolded model."""
    if share is None:
        return "no bound: ONNX Runtime's profiler gave no kernel times for this provider"
    where = "with ORT's optimizations off" if isolate else "after ORT's own optimizations"
    return (
        f"BatchNormalization kernels are {share * 100:.1f}% of the unfolded model's kernel time "
        f"({where}, ONNX Runtime's profiler), so folding can make it at most "
        f"{1 / (1 - share):.3f}x as fast"
    )
