"""The tables of bench/throughput.py: per-model rows, the targets, the markdown record."""

from __future__ import annotations

from dataclasses import dataclass

import throughput_load as load

START, END = "<!-- throughput:start -->", "<!-- throughput:end -->"


@dataclass(frozen=True)
class Row:
    """One line of a model's table: a server and the payload it gets."""

    server: str  # ServerSpec.key
    label: str
    kind: str  # json or binary
    batch: int


@dataclass(frozen=True)
class Cell:
    model: str
    row: Row
    clients: int
    result: load.LoadResult


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def model_table(
    model: str, cells: list[Cell], clients: list[int], raw: dict[int, float]
) -> list[str]:
    lines = [
        f"**{model}** (raw ONNX Runtime: {fmt_rate(raw[1])} samples/s at batch 1, "
        f"{fmt_rate(raw[max(raw)])} at batch {max(raw)})",
        "",
        "| server | "
        + " | ".join(f"{c} clients: req/s, p50, p99 ms" for c in clients)
        + f" | server CPU us/req @{clients[-1]} | other CPUs busy | errors |",
        "|---|" + "---|" * len(clients) + "---|---|---|",
    ]
    seen: list[Row] = []
    for cell in cells:
        if cell.model == model and cell.row not in seen:
            seen.append(cell.row)
    for row in seen:
        mine = {c.clients: c.result for c in cells if c.model == model and c.row == row}
        parts = []
        for c in clients:
            r = mine[c]
            samples = f" ({fmt_rate(r.rps * row.batch)} samples/s)" if row.batch > 1 else ""
            parts.append(f"{fmt_rate(r.rps)}{samples}, {r.p50_ms:.1f}, {r.p99_ms:.1f}")
        errors = sum(r.errors for r in mine.values())
        other = max(r.other_cores for r in mine.values())
        lines.append(
            f"| {row.label} | "
            + " | ".join(parts)
            + f" | {mine[clients[-1]].server_cpu_us:,.0f} | {other:.2f} | {errors} |"
        )
    return lines


def find(
    cells: list[Cell], model: str, server: str, kind: str, batch: int, clients: int
) -> load.LoadResult | None:
    for c in cells:
        r = c.row
        if (c.model, r.server, r.kind, r.batch, c.clients) == (model, server, kind, batch, clients):
            return c.result
    return None


def targets(
    cells: list[Cell], raw: dict[str, dict[int, float]], tiny: str, heavy: str, big: int, top: int
) -> list[str]:
    """The issue's targets as measured ratios, each PASS or MISS."""
    lines = [f"| target ({top} clients) | measured | goal | |", "|---|---|---|---|"]

    def add(
        what: str, value: float | None, goal: float, higher: bool = True, unit: str = "x"
    ) -> None:
        if value is None:
            lines.append(f"| {what} | not measured | {goal:g}{unit} | |")
            return
        ok = value >= goal if higher else value < goal
        shown = f"{value:.0%}" if unit == "%" else f"{value:.2f}x"
        goal_shown = f">= {goal:.0%}" if unit == "%" else f"{'>=' if higher else '<'} {goal:g}x"
        lines.append(f"| {what} | {shown} | {goal_shown} | {'PASS' if ok else 'MISS'} |")

    def rps(model: str, server: str, kind: str = "json", batch: int = 1) -> float | None:
        r = find(cells, model, server, kind, batch, top)
        return None if r is None else r.rps

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    fold = rps(tiny, "fold")
    add(f"{tiny}: FoldServe JSON / HTTP floor", ratio(fold, rps(tiny, "floor")), 0.70, unit="%")
    add(f"{tiny}: FoldServe JSON / naive", ratio(fold, rps(tiny, "naive")), 2.5)
    add(f"{tiny}: FoldServe JSON / KServe", ratio(fold, rps(tiny, "kserve")), 2.0)
    mine, naive = (
        find(cells, tiny, "fold", "json", 1, top),
        find(cells, tiny, "naive", "json", 1, top),
    )
    if mine is not None and naive is not None:
        add(
            f"{tiny}: FoldServe p99 / naive p99 ({mine.p99_ms:.1f} vs {naive.p99_ms:.1f} ms)",
            mine.p99_ms / naive.p99_ms,
            1.0,
            higher=False,
        )
    heavy_on = rps(heavy, "fold")
    add(f"{heavy}: batching on / off", ratio(heavy_on, rps(heavy, "fold-off")), 1.8)
    add(
        f"{heavy}: batching on / raw ORT batch-{big} samples/s",
        ratio(heavy_on, raw.get(heavy, {}).get(big)),
        0.75,
        unit="%",
    )
    add(
        f"{heavy}: binary / JSON, batch-{big} requests",
        ratio(rps(heavy, "fold", "binary", big), rps(heavy, "fold", "json", big)),
        3.0,
    )
    return lines
