"""What folding did with every BatchNorm module: folded into which layer, or kept and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from rich.markup import escape
from rich.table import Table
from torch import nn

Direction = Literal["backward", "forward"]

DIRECTIONS = "backward: into the layer before the BN; forward: into the layer after it"


@dataclass(frozen=True)
class FoldedBN:
    """BN ``bn`` was folded into layer ``into`` (backward: layer -> BN; forward: BN -> layer)."""

    bn: str
    into: str
    direction: Direction
    bn_type: str = ""  # e.g. "BatchNorm1d"
    bn_shape: list[int] = field(default_factory=list)  # per-channel parameters: [C]
    into_type: str = ""  # e.g. "Linear"; "Conv2d, Conv2d" for the producers of a concat
    into_shape: list[int] = field(default_factory=list)  # the weight's ([] for several)


@dataclass(frozen=True)
class KeptBN:
    """BN ``bn`` is still in the folded model, for ``reason``."""

    bn: str
    reason: str
    bn_type: str = ""
    bn_shape: list[int] = field(default_factory=list)


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did with every BatchNorm module, in ``named_modules`` order."""

    folded: list[FoldedBN] = field(default_factory=list)
    kept: list[KeptBN] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """JSON-ready: ``{"folded": [{bn, bn_type, bn_shape, into, into_type, into_shape,
        direction}], "kept": [{bn, bn_type, bn_shape, reason}]}``."""
        return {"folded": [asdict(f) for f in self.folded], "kept": [asdict(k) for k in self.kept]}

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
                replace(
                    f,
                    bn_type=bn_type,
                    bn_shape=bn_shape,
                    into_type=", ".join(t for t, _ in into),
                    into_shape=into[0][1] if len(into) == 1 else [],
                )
            )
        kept = [replace(k, bn_type=kind(k.bn)[0], bn_shape=kind(k.bn)[1]) for k in self.kept]
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

    def table(self) -> Table:
        """A rich table (BN, result, detail) for a console (print :data:`DIRECTIONS` with it)."""
        table = Table(title=f"BatchNorm folding: {len(self.folded)} folded, {len(self.kept)} kept")
        for column in ("BN (type, channels)", "result", "into (type, weight shape) / reason"):
            table.add_column(column)
        for row in self._rows():
            table.add_row(*(escape(cell) for cell in row))
        return table

    def __str__(self) -> str:
        rows = [("BN", "result", "into / reason"), *self._rows()]
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows)
