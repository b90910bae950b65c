"""What a fold did, as users and the repository see it."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from pydantic import BaseModel

from foldserve.model_format import FoldedBatchNorm, FoldRecord, KeptBatchNorm


class OnnxFoldReport(BaseModel):
    """Every affine site folded (into which layer, which way) or kept (why), the BN node
    counts before and after (subgraphs included), and the self-check's result."""

    folded: list[FoldedBatchNorm]
    kept: list[KeptBatchNorm]
    batchnorm_before: int
    batchnorm_after: int
    max_abs_diff: float
    tolerance: float
    passed: bool
    check_inputs: str  # how the self-check's inputs were made

    def fold_record(self) -> FoldRecord:
        """The part that goes into a version's ``metadata.json``."""
        return FoldRecord(folded=self.folded, kept=self.kept)

    def summary(self) -> list[str]:
        """Human-readable lines: each fold, each kept site with its reason, the parity."""
        lines = [
            f"folded {f.bn_type} '{f.bn}' {f.direction} into {f.into_type} '{f.into}'"
            for f in self.folded
        ]
        lines += [f"kept {k.bn_type} '{k.bn}': {k.reason}" for k in self.kept]
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(
            f"BatchNormalization nodes {self.batchnorm_before} -> {self.batchnorm_after}; "
            f"max abs diff {self.max_abs_diff:.3g} vs tolerance {self.tolerance:.3g}: {verdict} "
            f"({self.check_inputs})"
        )
        return lines


@dataclass
class FoldOutcome:
    model: onnx.ModelProto  # the folded graph; passes onnx.checker with full shape inference
    report: OnnxFoldReport


class FoldCheckFailed(ValueError):
    """The folded graph does not match the original within tolerance (or cannot be
    verified); ``report`` says what was folded and what the check measured."""

    def __init__(self, message: str, report: OnnxFoldReport) -> None:
        super().__init__(message)
        self.report = report
