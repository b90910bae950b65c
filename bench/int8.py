"""INT8 after folding, against INT8 before it: size, latency and accuracy, per model.

    python bench/int8.py [--runs runs] [--models NAME,...] [--seconds 6] [--no-write]

Per model, six ONNX files, all run by ONNX Runtime's CPU provider as the service
runs them (ORT_ENABLE_ALL, spinning off):

- FP32 unfolded (BN nodes kept) and FP32 folded;
- INT8 from folded (what ``export --int8`` writes): ONNX Runtime's
  ``quant_pre_process`` of the folded file (its recommended step: shape
  inference and ORT's basic graph optimizations), then
  ``training.quantize.quantize_qdq``, the calibration method chosen as
  ``export --int8`` chooses it (best validation accuracy; for the public models,
  best FP32 agreement on the calibration inputs); and the same without
  pre-processing;
- INT8 from unfolded: the same quantization of the unfolded file, as is, and
  pre-processed first (ORT's basic optimizations fuse Conv+BatchNormalization,
  not Gemm+BatchNormalization).

The three default models (``runs/<name>``, as ``make models`` trains them) are
calibrated on 256 samples of their training split and scored on their test split.
Two public architectures that fold fully (random weights, randomized BN
statistics; nothing downloaded) at a small input size are exported with their BN
nodes (``bench/onnx_fold_networks.py``'s exporter) and folded by
``foldserve.onnx_fold``; they are calibrated on 256 seeded normal inputs and scored by
argmax agreement with FP32 folded on 256 other ones. Latency: p50 per
``session.run`` at batch 1 and 8, with 1 thread and with the default (every usable
CPU), the six files interleaved round by round. Writes the tables into
``docs/benchmarks.md`` and ``docs/folding.md`` between ``<!-- int8:start -->`` and
``<!-- int8:end -->``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from markdown_section import publish
from onnx_fold_networks import export as export_bn_kept  # a sibling script

from foldserve.latency_stats import paired_speedup
from foldserve.model_graph import batchnorm_nodes
from foldserve.onnx_fold import fold_model
from service.models.sessions import SessionFactory
from service.process.machine import usable_cpus
from training.batchnorm import randomize_batchnorm
from training.export import build_version, run_dataset
from training.quantize import (
    METHODS,
    Int8Options,
    Samples,
    build_int8,
    calibration_sample,
    preprocess,
    quantize_qdq,
)
from training.train import load_run

START, END = "<!-- int8:start -->", "<!-- int8:end -->"
DEFAULTS = ("digits_cnn", "breast_cancer_mlp", "resnet_bench")
CALIBRATION = 256
VARIANTS = (
    "FP32 unfolded",
    "FP32 folded",
    "INT8 from folded",
    "INT8 from folded, not pre-processed",
    "INT8 from unfolded",
    "INT8 from unfolded, pre-processed",
)


def _pytorchcv_resnet20() -> torch.nn.Module:
    from pytorchcv.models.resnet_cifar import resnet20_cifar10

    model: torch.nn.Module = resnet20_cifar10()
    return model


def _efficientnet_b0() -> torch.nn.Module:
    from efficientnet_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-b0")
    net.set_swish(memory_efficient=False)  # the exportable Swish
    model: torch.nn.Module = net
    return model


PUBLIC = {  # name -> (package, builder, input shape)
    "resnet20_cifar10": ("pytorchcv", _pytorchcv_resnet20, (3, 32, 32)),
    "efficientnet-b0": ("efficientnet_pytorch", _efficientnet_b0, (3, 96, 96)),
}


@dataclass
class Model:
    name: str
    files: dict[str, bytes]
    scored_on: str  # what the accuracy column is
    scores: dict[str, float]  # variant -> accuracy or agreement
    rel_diff: dict[str, float]  # variant -> max |out - FP32 folded out| / max |FP32 folded out|
    method: str
    candidates: dict[str, float]
    bn_after_preprocess: int
    latency: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)  # p50 ms
    int8_speedup: dict[tuple[int, int], str] = field(default_factory=dict)


def preprocessed(model: bytes) -> bytes:
    found = preprocess(model)
    assert found is not None, "quant_pre_process failed"
    return found


def run(model: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def rel_diffs(outputs: dict[str, np.ndarray]) -> dict[str, float]:
    ref = outputs["FP32 folded"].astype(np.float64)
    scale = float(np.abs(ref).max()) or 1.0
    return {v: float(np.abs(out - ref).max()) / scale for v, out in outputs.items()}


def quantized_files(
    folded: bytes, unfolded: bytes, name_in: str, cal: np.ndarray, method: str
) -> dict[str, bytes]:
    return {
        "FP32 unfolded": unfolded,
        "FP32 folded": folded,
        "INT8 from folded": quantize_qdq(preprocessed(folded), name_in, cal, method),
        "INT8 from folded, not pre-processed": quantize_qdq(folded, name_in, cal, method),
        "INT8 from unfolded": quantize_qdq(unfolded, name_in, cal, method),
        "INT8 from unfolded, pre-processed": quantize_qdq(
            preprocessed(unfolded), name_in, cal, method
        ),
    }


def default_model(runs: Path, name: str) -> Model:
    r = load_run(runs / name)
    folded, unfolded, md, _ = build_version(r, name)
    ds = run_dataset(r)
    test = Samples(ds.X_test, ds.y_test, "test split")
    _, record = build_int8(
        folded,
        ("input", "logits"),
        Samples(ds.X_train, ds.y_train, "training split"),
        Samples(ds.X_val, ds.y_val, "validation split"),
        test,
        md.reference.inputs["input"].array(),
        Int8Options(tolerance=1.0),  # measure, never refuse
    )
    method = record.calibration.method
    cal = calibration_sample(ds.X_train, CALIBRATION)
    files = quantized_files(folded, unfolded, "input", cal, method)
    outputs = {v: run(b, ds.X_test) for v, b in files.items()}
    scores = {v: float((out.argmax(1) == ds.y_test).mean()) for v, out in outputs.items()}
    # Test accuracy of INT8 from folded under every method, beside the validation score
    # the choice was made on.
    tests = {}
    for m in METHODS:
        logits = run(quantize_qdq(preprocessed(folded), "input", cal, m), ds.X_test)
        tests[m] = float((logits.argmax(1) == ds.y_test).mean())
    candidates = {f"{m} val": v for m, v in record.calibration.candidates.items()}
    candidates.update({f"{m} test": v for m, v in tests.items()})
    pre_bn = batchnorm_nodes(onnx.load_model_from_string(preprocessed(unfolded)))
    scored_on = f"test accuracy ({len(ds.X_test)})"
    return Model(name, files, scored_on, scores, rel_diffs(outputs), method, candidates, pre_bn)


def public_model(name: str, seed: int = 0) -> Model:
    _, build, shape = PUBLIC[name]
    torch.manual_seed(seed)
    module = build().eval()
    randomize_batchnorm(module, torch.Generator().manual_seed(seed))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed + 1))
    proto, _ = export_bn_kept(module, x)
    unfolded = proto.SerializeToString()
    folded = fold_model(proto, seed=seed).model.SerializeToString()
    rng = np.random.default_rng(seed)
    cal = rng.standard_normal((CALIBRATION, *shape)).astype(np.float32)
    evaluation = np.random.default_rng(seed + 1).standard_normal((256, *shape)).astype(np.float32)
    name_in = proto.graph.input[0].name
    reference = run(folded, evaluation).argmax(1)
    fp32_cal = run(folded, cal).argmax(1)
    pre = preprocessed(folded)
    candidates = {
        f"{m} cal-agree": float(
            (run(quantize_qdq(pre, name_in, cal, m), cal).argmax(1) == fp32_cal).mean()
        )
        for m in METHODS
    }
    method = max(METHODS, key=lambda m: candidates[f"{m} cal-agree"])
    files = quantized_files(folded, unfolded, name_in, cal, method)
    outputs = {v: run(b, evaluation) for v, b in files.items()}
    scores = {v: float((out.argmax(1) == reference).mean()) for v, out in outputs.items()}
    pre_bn = batchnorm_nodes(onnx.load_model_from_string(preprocessed(unfolded)))
    scored_on = "agreement with FP32 folded (256)"
    return Model(name, files, scored_on, scores, rel_diffs(outputs), method, candidates, pre_bn)


def time_variants(model: Model, shape: tuple[int, ...], seconds: float) -> None:
    """p50 ms of every file at batch 1 and 8, 1 thread and the default, interleaved."""
    for threads in (1, usable_cpus()):
        factory = SessionFactory("cpu", threads, "off")
        sessions = {v: factory.create(b) for v, b in model.files.items()}
        for batch in (1, 8):
            x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
            feeds = {v: {s.get_inputs()[0].name: x} for v, s in sessions.items()}
            for v, s in sessions.items():  # warm-up, and the pace
                for _ in range(5):
                    s.run(None, feeds[v])
            t0 = time.perf_counter()
            for v, s in sessions.items():
                s.run(None, feeds[v])
            rounds = int(min(2000, max(30, seconds / max(time.perf_counter() - t0, 1e-6))))
            times = {v: np.empty(rounds) for v in sessions}
            order = list(sessions)
            for i in range(rounds):
                for v in order[i % len(order) :] + order[: i % len(order)]:
                    start = time.perf_counter()
                    sessions[v].run(None, feeds[v])
                    times[v][i] = time.perf_counter() - start
            model.latency[(threads, batch)] = {
                v: float(np.median(t)) * 1e3 for v, t in times.items()
            }
            sp = paired_speedup(times["FP32 folded"], times["INT8 from folded"])
            model.int8_speedup[(threads, batch)] = (
                f"{sp.ratio:.2f} [{sp.ci_low:.2f}, {sp.ci_high:.2f}]"
            )


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    fields = dict(
        line.split(":", 1) for line in text.splitlines()[:40] if ":" in line
    )  # the first processor's fields
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    wanted = [f for f in flags if f.startswith(("avx", "amx")) or "vnni" in f]
    model = fields.get("model name", "?")
    vnni = "VNNI: yes" if any("vnni" in f for f in flags) else "VNNI: no"
    return f"{model}; {vnni}; flags: {' '.join(wanted) or 'none of avx/amx/vnni'}"


def tables(models: list[Model], threads: int) -> list[str]:
    lines = [
        "| model | variant | file KB | BN nodes | accuracy / agreement | max rel. diff | "
        f"p50 ms b1 1t | p50 ms b8 1t | p50 ms b1 {threads}t | p50 ms b8 {threads}t |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        for v in VARIANTS:
            data = m.files[v]
            bn = batchnorm_nodes(onnx.load_model_from_string(data))
            cells = [m.name, v, f"{len(data) / 1024:.0f}", str(bn), f"{m.scores[v]:.4f}"]
            cells.append(f"{m.rel_diff[v]:.1e}")
            cells += [f"{m.latency[(t, b)][v]:.4f}" for t in (1, threads) for b in (1, 8)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "INT8 from folded against FP32 folded (folded p50 / int8 p50, paired bootstrap 95% CI), "
        "the calibration method used, and what it was chosen on:",
        "",
        f"| model | scored on | b1 1t | b8 1t | b1 {threads}t | b8 {threads}t | method | "
        "candidates | BN nodes left by pre-processing |",
        "|---|---|---|---|---|---|---|---|---:|",
    ]
    for m in models:
        cand = ", ".join(f"{k} {v:.4f}" for k, v in m.candidates.items())
        cells = [m.name, m.scored_on]
        cells += [m.int8_speedup[(t, b)] for t in (1, threads) for b in (1, 8)]
        cells += [m.method, cand, str(m.bn_after_preprocess)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--models", default=",".join((*DEFAULTS, *PUBLIC)))
    parser.add_argument("--seconds", type=float, default=6.0, help="timing per cell")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = []
    shape: tuple[int, ...]
    for name in args.models.split(","):
        print(f"{name}: quantizing", file=sys.stderr)
        if name in PUBLIC:
            model, shape = public_model(name), PUBLIC[name][2]
        else:
            model = default_model(args.runs, name)
            shape = tuple(load_run(args.runs / name).model_cfg.input_shape)
        print(f"{name}: timing", file=sys.stderr)
        time_variants(model, shape, args.seconds)
        models.append(model)
    threads = usable_cpus()
    lines = [
        f"- command: `{shlex.join(['python', 'bench/int8.py', *sys.argv[1:]])}`",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; onnxruntime {ort.__version__} "
        f"(CPUExecutionProvider, ORT_ENABLE_ALL, spinning off), onnx {onnx.__version__}, "
        f"torch {torch.__version__}; {threads} usable CPUs (shared with other work)",
        f"- CPU: {cpu_flags()}",
        "- GPU: none on this machine, so no CUDA provider numbers",
        "- INT8: QDQ, per-channel INT8 weights in a 7-bit range, UINT8 activations, "
        f"{CALIBRATION} calibration samples; public models: random weights and BN statistics, "
        "inputs resnet20_cifar10 3x32x32, efficientnet-b0 3x96x96",
        "",
        *tables(models, threads),
    ]
    text_doc, folding_doc = Path("docs/benchmarks.md"), Path("docs/folding.md")
    publish(lines, text_doc, START, END, write=not args.no_write)
    if not args.no_write:
        publish(lines, folding_doc, START, END, write=True)


if __name__ == "__main__":
    main()
