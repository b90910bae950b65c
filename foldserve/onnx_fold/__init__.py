"""Fold BatchNormalization (and the per-channel Mul/Add some exporters turn it into) in any
ONNX model, without torch.

:func:`fold_model` folds a copy of the model and verifies it against the original in ONNX
Runtime; :func:`fold_file` does the same for files, writing the result atomically. Patterns,
refusals and the tolerance are described in ``docs/folding.md``. Modules: ``graph`` (the
graph as the rules see it), ``sites`` (BN and Mul/Add runs as affine maps), ``weights``
(the float64 math), ``backward``/``forward`` (the rules), ``rewrite`` (the loop),
``check`` (the ORT self-check), ``report``."""

from __future__ import annotations

from pathlib import Path

import onnx

from foldserve.files import write_atomic
from foldserve.model_graph import batchnorm_nodes
from foldserve.onnx_fold.check import RELATIVE_TOLERANCE, CheckError, compare, weight_type
from foldserve.onnx_fold.report import FoldCheckFailed, FoldOutcome, OnnxFoldReport
from foldserve.onnx_fold.rewrite import fold_graphs

__all__ = [
    "FoldCheckFailed",
    "FoldOutcome",
    "OnnxFoldReport",
    "default_tolerance",
    "fold_file",
    "fold_model",
]


def default_tolerance(model: onnx.ModelProto, output_scale: float) -> float:
    """Max abs diff allowed: a per-dtype relative tolerance (of the model's narrowest float
    type) times the largest |output| of the original (at least 1)."""
    return RELATIVE_TOLERANCE[weight_type(model)] * output_scale


def fold_model(
    model: onnx.ModelProto, *, tolerance: float | None = None, seed: int = 0
) -> FoldOutcome:
    """Fold every foldable BN (and per-channel Mul/Add) of a copy of ``model``; ``model`` is
    not changed. The result passes ``onnx.checker`` (full check) and matches the original in
    ONNX Runtime within ``tolerance`` (absolute; default :func:`default_tolerance`).

    Raises FoldCheckFailed (with the report) when it does not, or cannot be verified."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    done, kept = fold_graphs(folded)
    before, after = batchnorm_nodes(model), batchnorm_nodes(folded)

    def report(diff: float, tol: float, passed: bool, inputs: str) -> OnnxFoldReport:
        return OnnxFoldReport(
            folded=done,
            kept=kept,
            batchnorm_before=before,
            batchnorm_after=after,
            max_abs_diff=diff,
            tolerance=tol,
            passed=passed,
            check_inputs=inputs,
        )

    try:
        onnx.checker.check_model(folded, full_check=True)
        parity = compare(model, folded, seed)
    except (CheckError, onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise FoldCheckFailed(
            f"the folded model could not be verified: {err}",
            report(float("nan"), tolerance or float("nan"), False, "not run"),
        ) from err
    tol = default_tolerance(model, parity.output_scale) if tolerance is None else tolerance
    result = report(parity.max_abs_diff, tol, parity.max_abs_diff <= tol, parity.inputs)
    if not result.passed:
        raise FoldCheckFailed(
            f"folded outputs differ by {parity.max_abs_diff:.3g}, above the tolerance {tol:.3g}",
            result,
        )
    return FoldOutcome(folded, result)


def fold_file(
    src: Path, dst: Path, *, tolerance: float | None = None, report: Path | None = None
) -> OnnxFoldReport:
    """Fold ``src`` into ``dst`` (written atomically: a temporary file renamed into place,
    nothing written when the check fails); the report as JSON to ``report`` if given.

    Raises OSError / onnx's DecodeError-based ValueError on an unreadable file, and
    FoldCheckFailed as :func:`fold_model`."""
    model = onnx.load(str(src))
    outcome = fold_model(model, tolerance=tolerance)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dst, outcome.model.SerializeToString())
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(report, outcome.report.model_dump_json(indent=2).encode())
    return outcome.report


from foldserve.onnx_fold.version import derive_version as derive_version  # noqa: E402
