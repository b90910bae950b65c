"""Fold BN in public architectures at the ONNX level, as a user's exported file would be.

    python bench/onnx_fold_networks.py [--models NAME,...] [--no-write]

The models of ``bench/fold_sites.py`` (efficientnet_pytorch, geffnet, pytorchcv; random
weights, randomized BN statistics, eval mode, 224x224 RGB) are exported with their
BatchNormalization nodes kept: TorchScript ``torch.onnx.export(..., dynamo=False,
do_constant_folding=False)`` as older exporters did, or, where that exporter fails,
``training.onnx_graph.export_onnx`` (dynamo, BN kept). ``foldserve.onnx_fold.fold_model``
folds each; the table gives BN nodes before and after, what was kept and why (grouped
below it), the self-check's max abs diff against its tolerance, the folded ONNX against
eager PyTorch (max relative error, batch 2), and the fold's wall time. Written into
``docs/folding.md`` between ``<!-- onnx_fold_networks:start -->`` and ``:end -->``.
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from fold_sites import INPUT, MODELS, chosen_models, kept_reasons  # siblings, as throughput.py
from markdown_section import publish
from torch import nn

from foldserve.onnx_fold import OnnxFoldReport, fold_model
from training.batchnorm import randomize_batchnorm
from training.onnx_graph import export_onnx

START, END = "<!-- onnx_fold_networks:start -->", "<!-- onnx_fold_networks:end -->"


@dataclass(frozen=True)
class Row:
    model: str
    package: str
    exporter: str
    report: OnnxFoldReport
    rel_error_vs_torch: float
    seconds: float


def export(module: nn.Module, x: torch.Tensor) -> tuple[onnx.ModelProto, str]:
    """BN kept: TorchScript exporter first, dynamo (``export_onnx``) where it fails."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (x,),
                buffer,  # type: ignore[arg-type]  # a file object works, the stub says path
                dynamo=False,
                do_constant_folding=False,
                opset_version=13,
                training=torch.onnx.TrainingMode.PRESERVE,
                input_names=["input"],
                dynamic_axes={"input": {0: "batch"}},
            )
        return onnx.load_from_string(buffer.getvalue()), "TorchScript"
    except Exception as err:  # the TorchScript exporter fails in many ways (scripted code)
        print(f"TorchScript export failed ({type(err).__name__}); dynamo", file=sys.stderr)
        return export_onnx(module, x), "dynamo"


def measure(name: str, seed: int) -> Row:
    package, build = MODELS[name]
    torch.manual_seed(seed)
    module = build().eval()
    randomize_batchnorm(module, torch.Generator().manual_seed(seed))
    x = torch.randn(2, *INPUT, generator=torch.Generator().manual_seed(seed + 1))
    model, exporter = export(module, x)
    start = time.perf_counter()
    outcome = fold_model(model, seed=seed)
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        expected = module(x).numpy()
    session = ort.InferenceSession(
        outcome.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    rel = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
    return Row(name, package, exporter, outcome.report, rel, seconds)


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| model | package | exporter | BN before -> after | folded | kept "
        "| self-check max abs diff (tolerance) | max rel. error vs PyTorch | fold + check, s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rep = r.report
        cells = [r.model, r.package, r.exporter]
        cells += [f"{rep.batchnorm_before} -> {rep.batchnorm_after}", str(len(rep.folded))]
        cells += [str(len(rep.kept)), f"{rep.max_abs_diff:.1e} ({rep.tolerance:.1e})"]
        cells += [f"{r.rel_error_vs_torch:.1e}", f"{r.seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS), help="a subset of these")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--doc", type=Path, default=Path("docs/folding.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    names = chosen_models(parser, args.models)
    rows = [measure(n, args.seed) for n in names]
    lines = [
        f"- command: `{shlex.join(['python', 'bench/onnx_fold_networks.py', *sys.argv[1:]])}`",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}; inputs {INPUT}, float32; "
        f"self-check: {rows[0].report.check_inputs if rows else '-'}",
        "",
        *table(rows),
        "",
        *kept_reasons([(r.model, r.report.kept) for r in rows]),
    ]
    publish(lines, args.doc, START, END, write=not args.no_write)


if __name__ == "__main__":
    main()
