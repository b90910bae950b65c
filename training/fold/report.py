"""What folding did with every BatchNorm module: folded into which layer, or kept and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from rich.table import Table

Direction = Literal["backward", "forward"]


@dataclass(frozen=True)
class FoldedBN:
    """BN ``bn`` was folded into layer ``into`` (backward: layer -> BN; forward: BN -> layer)."""

    bn: str
    into: str
    direction: Direction


@dataclass(frozen=True)
class KeptBN:
    """BN ``bn`` is still in the folded model, for ``reason``."""

    bn: str
    reason: str


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did with every BatchNorm module, in ``named_modules`` order."""

    folded: list[FoldedBN] = field(default_factory=list)
    kept: list[KeptBN] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[dict[str, str]]]:
        """JSON-ready: ``{"folded": [{bn, into, direction}], "kept": [{bn, reason}]}``."""
        return {"folded": [asdict(f) for f in self.folded], "kept": [asdict(k) for k in self.kept]}

    def _rows(self) -> list[tuple[str, str, str]]:
        return [(f.bn, "folded", f"{f.direction} into '{f.into}'") for f in self.folded] + [
            (k.bn, "kept", k.reason) for k in self.kept
        ]

    def table(self) -> Table:
        """A rich table (BN, result, detail) for a console."""
        table = Table(title=f"BatchNorm folding: {len(self.folded)} folded, {len(self.kept)} kept")
        for column in ("BN", "result", "into / reason"):
            table.add_column(column)
        for row in self._rows():
            table.add_row(*row)
        return table

    def __str__(self) -> str:
        rows = [("BN", "result", "into / reason"), *self._rows()]
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows)
