"""Which INT8 types to quantize to on this CPU: accuracy and speed of each choice.

    python bench/int8_kernels.py [--run runs/resnet_bench] [--rounds 150]

The run's folded model (``training.export.build_version``), quantized statically
(QDQ, per-channel weights, MinMax on 256 training samples, no pre-processing) with
UINT8 or INT8 activations, INT8 or UINT8 weights, full 8-bit or 7-bit
(``reduce_range``) weights; per choice: test accuracy and p50 at batch 8 on one
thread, interleaved with the FP32 folded model, and the speedup with its
paired-bootstrap interval. ONNX Runtime's CPU kernels differ by instruction set
(VNNI or not), so the answer is this machine's; the CPU flags are printed. The
result chose ``training.quantize``'s types (docs/folding.md records a run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from int8 import cpu_flags  # a sibling script
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from foldserve.latency_stats import paired_speedup
from service.models.sessions import SessionFactory
from training.export import build_version, run_dataset
from training.quantize import CalibrationBatches, calibration_sample, run_model
from training.train import load_run

CHOICES: dict[str, dict[str, Any]] = {
    "UINT8 / INT8 (U8S8)": {},
    "UINT8 / INT8 in 7 bits (U8S8, reduce_range)": {"reduce_range": True},
    "INT8 / INT8 (S8S8)": {"activation_type": QuantType.QInt8},
    "UINT8 / UINT8 (U8U8)": {"weight_type": QuantType.QUInt8},
}


def quantized(folded: bytes, calibration: np.ndarray, options: dict[str, Any]) -> bytes:
    kwargs: dict[str, Any] = {
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        **options,
    }
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        source.write_bytes(folded)
        quantize_static(
            source,
            target,
            CalibrationBatches("input", calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            **kwargs,
        )
        return target.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, default=Path("runs/resnet_bench"))
    parser.add_argument("--rounds", type=int, default=150)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer warns on the root logger
    run = load_run(args.run)
    folded = build_version(run, "m")[0]
    ds = run_dataset(run)
    calibration = calibration_sample(ds.X_train, 256)
    files = {"FP32 folded": folded}
    files.update({name: quantized(folded, calibration, kw) for name, kw in CHOICES.items()})
    sessions = {name: SessionFactory("cpu", 1, "off").create(b) for name, b in files.items()}
    x = np.random.default_rng(0).standard_normal((8, *ds.input_shape)).astype(np.float32)
    times = {name: np.empty(args.rounds) for name in files}
    for i in range(args.rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"input": x})
            times[name][i] = time.perf_counter() - start
    print(f"- command: `python bench/int8_kernels.py --run {args.run} --rounds {args.rounds}`")
    print(f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; CPU: {cpu_flags()}")
    print()
    print(
        "| activations / weights | test accuracy | p50 ms, batch 8, 1 thread | speedup [95% CI] |"
    )
    print("|---|---:|---:|---|")
    for name, data in files.items():
        accuracy = float((run_model(data, "input", ds.X_test).argmax(1) == ds.y_test).mean())
        sp = paired_speedup(times["FP32 folded"], times[name])
        p50 = float(np.median(times[name])) * 1e3
        cells = [
            name,
            f"{accuracy:.4f}",
            f"{p50:.3f}",
            f"{sp.ratio:.2f} [{sp.ci_low:.2f}, {sp.ci_high:.2f}]",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
