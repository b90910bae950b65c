"""``python -m training fold-onnx``: fold BN in any ONNX file with :mod:`foldserve.onnx_fold`
(torch-free), say what folded, what was kept and why, and whether the self-check passed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from google.protobuf.message import DecodeError

from foldserve.onnx_fold import FoldCheckFailed, OnnxFoldReport, fold_file
from training.terminal import console, fail


def _show(report: OnnxFoldReport) -> None:
    for line in report.summary():
        console.print(line, highlight=False, soft_wrap=True, markup=False)


def fold_onnx_cmd(
    src: Annotated[Path, typer.Argument(help="ONNX model to fold (read only)")],
    dst: Annotated[Path, typer.Argument(help="where to write the folded model")],
    report: Annotated[
        Path | None,
        typer.Option(help="also write the fold report here, as JSON [default: not written]"),
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="max abs difference allowed between original and folded outputs "
            "(default: 1e-4, or 10 ulps of the model's narrowest float type, times the "
            "largest |output|)",
        ),
    ] = None,
) -> None:
    """Fold BatchNormalization (and per-channel Mul/Add) into neighbouring layers of any
    ONNX model, check the result in ONNX Runtime, and write it only if it matches."""
    try:
        result = fold_file(src, dst, tolerance=tolerance, report=report)
    except FoldCheckFailed as err:
        _show(err.report)
        fail(f"{err}; {dst} not written")
        return
    except (OSError, DecodeError) as err:
        fail(f"cannot read {src}: {err}")
        return
    _show(result)
    console.print(f"wrote {dst}" + (f" and {report}" if report else ""), highlight=False)
