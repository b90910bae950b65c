"""What folding did with every BatchNorm module: folded into which layer, or kept and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from rich.markup import escape
from rich.table import Table
from torch import nn

from foldserve.model_format import FoldedBatchNorm, FoldRecord, KeptBatchNorm

Direction = Literal["backward", "forward"]

DIRECTIONS = "backward: into the layer before the BN; forward: into the layer after it"


RANGE_COLUMN = "folded |W'| per output channel: min - max (max/min)"
RANGE_NOTE = (
    "max/min: how far apart the output channels' largest |W'| are after folding; one INT8 "
    "scale per tensor spends its 256 steps on the widest channel, so a large spread needs "
    "per-channel scales (what `export --int8` uses)"
)


@dataclass(frozen=True)
class ChannelRange:
    """Over a layer's output channels c: the smallest and largest of max |W'[c]|."""

    low: float
    high: float

    @property
    def spread(self) -> float:
        return self.high / self.low if self.low > 0 else float("inf")

    def text(self) -> str:
        return f"{self.low:.3g} - {self.high:.3g} ({self.spread:.3g}x)"


def channel_range(weight: torch.Tensor) -> ChannelRange:
    """:class:`ChannelRange` of a weight whose axis 0 is the output channel (Conv, Linear)."""
    per_channel = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)  # (C_out,)
    return ChannelRange(float(per_channel.min()), float(per_channel.max()))


def channel_ranges(folded: nn.Module, report: FoldReport) -> dict[str, ChannelRange]:
    """The folded weights' :class:`ChannelRange` of every layer a BN was folded into (by
    layer name; layers absorbing several BNs, or without a weight, are left out)."""
    modules = dict(folded.named_modules())
    found = {}
    for f in report.folded:
        weight = getattr(modules.get(f.into), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim >= 2:
            found[f.into] = channel_range(weight)
    return found


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did with every BatchNorm module, in ``named_modules`` order.

    Its entries are the repository contract's own (``metadata.json``'s ``fold_report``):
    a folded BN's ``into_type`` may list several layers ("Conv2d, Conv2d" for the
    producers of a concat), with ``into_shape`` then empty."""

    folded: list[FoldedBatchNorm] = field(default_factory=list)
    kept: list[KeptBatchNorm] = field(default_factory=list)

    def record(self) -> FoldRecord:
        """The report as ``metadata.json`` stores it."""
        return FoldRecord(folded=self.folded, kept=self.kept)

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """JSON-ready: ``{"folded": [{bn, bn_type, bn_shape, into, into_type, into_shape,
        direction}], "kept": [{bn, bn_type, bn_shape, reason}]}``."""
        return self.record().model_dump()

    def described(self, model: nn.Module) -> FoldReport:
        """This report with the types and shapes of the layers it names, read from
        ``model`` (the unfolded network whose module names it uses)."""
        modules = dict(model.named_modules())

        def kind(name: str) -> tuple[str, list[int]]:
            module = modules.get(name)
            if module is None:
                return "", []
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                return type(module).__name__, [module.num_features]
            weight = getattr(module, "weight", None)
            return type(module).__name__, list(weight.shape) if weight is not None else []

        folded = []
        for f in self.folded:
            into = [kind(n) for n in f.into.split(", ")]
            bn_type, bn_shape = kind(f.bn)
            folded.append(
                f.model_copy(
                    update={
                        "bn_type": bn_type,
                        "bn_shape": bn_shape,
                        "into_type": ", ".join(t for t, _ in into),
                        "into_shape": into[0][1] if len(into) == 1 else [],
                    }
                )
            )
        kept = [
            k.model_copy(update={"bn_type": kind(k.bn)[0], "bn_shape": kind(k.bn)[1]})
            for k in self.kept
        ]
        return FoldReport(folded, kept)

    def _rows(self) -> list[tuple[str, str, str]]:
        def layer(name: str, kind: str, shape: list[int]) -> str:
            dims = f" {shape}" if shape else ""
            return f"{name} ({kind}{dims})" if kind else name

        return [
            (
                layer(f.bn, f.bn_type, f.bn_shape),
                "folded",
                f"{f.direction} into {layer(f.into, f.into_type, f.into_shape)}",
            )
            for f in self.folded
        ] + [(layer(k.bn, k.bn_type, k.bn_shape), "kept", k.reason) for k in self.kept]

    def table(self, ranges: dict[str, ChannelRange] | None = None) -> Table:
        """A rich table (BN, result, detail) for a console (print :data:`DIRECTIONS` with it);
        with ``ranges`` (:func:`channel_ranges`), a column of each folded layer's spread."""
        table = Table(title=f"BatchNorm folding: {len(self.folded)} folded, {len(self.kept)} kept")
        columns = ["BN (type, channels)", "result", "into (type, weight shape) / reason"]
        if ranges is not None:
            columns.append(RANGE_COLUMN)
        for column in columns:
            table.add_column(column)
        layers = [f.into for f in self.folded] + [""] * len(self.kept)
        for row, into in zip(self._rows(), layers, strict=True):
            cells = list(row)
            if ranges is not None:
                found = ranges.get(into)
                cells.append(found.text() if found is not None else "")
            table.add_row(*(escape(cell) for cell in cells))
        return table

    def __str__(self) -> str:
        rows = [("BN", "result", "into / reason"), *self._rows()]
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows)
