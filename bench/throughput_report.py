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


@dataclass(frozen=True)
class Bound:
    """The most of raw ONNX Runtime's batch-N rate any server can reach on this machine.

    Per sample the server must spend ``c`` (raw ONNX Runtime's CPU per sample at
    batch N) plus, per batch-1 request, at least ``h`` (the HTTP floor's CPU per
    request for the same body) and, for JSON, ``d`` (decoding it), so at most
    ``c / (c + h)`` of raw batch-N throughput, ``c / (c + h + d)`` with JSON.
    A row's share of its bound is ``(c + h [+ d]) / its CPU per request``: on an
    idle CPU-bound machine the same number as its samples/s over the bound's,
    and unlike that one it holds while other jobs take the machine's CPUs
    (which slows raw ONNX Runtime's measured rate as much as the servers').
    """

    c: float
    h: float
    d: float

    def least_cpu(self, kind: str) -> float:
        """CPU microseconds a batch-1 request costs at the least."""
        return self.c + self.h + (self.d if kind == "json" else 0.0)

    def of(self, kind: str) -> float:
        return self.c / self.least_cpu(kind)

    def share(self, kind: str, result: load.LoadResult) -> float:
        return self.least_cpu(kind) / result.server_cpu_us if result.server_cpu_us else 0.0


def bound_for(
    model: str, cells: list[Cell], raw: dict[int, load.RawRate], decode_us: float, top: int
) -> Bound | None:
    floor = find(cells, model, "floor", "json", 1, top)
    if floor is None:
        return None
    return Bound(raw[max(raw)].cpu_us, floor.server_cpu_us, decode_us)


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def model_table(
    model: str,
    cells: list[Cell],
    clients: list[int],
    raw: dict[int, load.RawRate],
    bound: Bound | None,
) -> list[str]:
    big = max(raw)
    lines = [
        f"**{model}** (raw ONNX Runtime: {fmt_rate(raw[1].rate)} samples/s at batch 1, "
        f"{fmt_rate(raw[big].rate)} at batch {big}, {raw[big].cpu_us:.0f} us of CPU "
        "per sample)",
        "",
    ]
    if bound is not None:
        lines += [
            f"Bound on this machine: c = {bound.c:.0f} us of CPU per sample (raw ONNX Runtime, "
            f"batch {big}), h = {bound.h:.0f} us per request (HTTP floor, {clients[-1]} "
            f"clients), d = {bound.d:.0f} us (FoldServe's JSON decoding of the batch-1 body): "
            f"no server exceeds c/(c+h) = {bound.of('binary'):.0%} of raw batch-{big} "
            f"samples/s with binary tensors, c/(c+h+d) = {bound.of('json'):.0%} with JSON. "
            "A row's share of its bound: (c+h[+d]) / its server CPU per request.",
            "",
        ]
    lines += [
        "| server | "
        + " | ".join(f"{c} clients: req/s, p50, p99 ms" for c in clients)
        + f" | server CPU us/req @{clients[-1]} | share of bound @{clients[-1]}"
        " | other CPUs busy | errors |",
        "|---|" + "---|" * len(clients) + "---|---|---|---|",
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
        top = mine[clients[-1]]
        share = "-"
        if bound is not None and row.server != "floor" and row.batch == 1:
            share = f"{bound.share(row.kind, top):.0%}"
        lines.append(
            f"| {row.label} | "
            + " | ".join(parts)
            + f" | {top.server_cpu_us:,.0f} | {share} | {other:.2f} | {errors} |"
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
    cells: list[Cell],
    raw: dict[str, dict[int, load.RawRate]],
    bounds: dict[str, Bound | None],
    tiny: str,
    heavy: str,
    big: int,
    top: int,
) -> list[str]:
    """The issue's targets as measured ratios, each PASS or MISS."""
    lines = [f"| target ({top} clients) | measured | goal | |", "|---|---|---|---|"]

    def add(
        what: str, value: float | None, goal: float, higher: bool = True, unit: str = "x"
    ) -> None:
        if value is None:
            lines.append(f"| {what} | not measured | {goal:g}{unit} | |")
            return
        ok = value >= goal if higher else value <= goal
        shown = f"{value:.0%}" if unit == "%" else f"{value:.2f}x"
        goal_shown = f">= {goal:.0%}" if unit == "%" else f"{'>=' if higher else '<='} {goal:g}x"
        lines.append(f"| {what} | {shown} | {goal_shown} | {'PASS' if ok else 'MISS'} |")

    def rps(model: str, server: str, kind: str = "json", batch: int = 1) -> float | None:
        r = find(cells, model, server, kind, batch, top)
        return None if r is None else r.rps

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    fold = rps(tiny, "fold")
    add(f"{tiny}: FoldServe JSON (defaults) / HTTP floor", ratio(fold, rps(tiny, "floor")), 0.85)
    add(f"{tiny}: FoldServe JSON / naive", ratio(fold, rps(tiny, "naive")), 2.5)
    add(f"{tiny}: FoldServe JSON / KServe", ratio(fold, rps(tiny, "kserve")), 2.0)
    mlserver = rps(tiny, "mlserver")
    lines.append(
        f"| {tiny}: FoldServe JSON / MLServer | "
        + ("not measured" if mlserver is None else f"{ratio(fold, mlserver):.2f}x")
        + " | (no target: the closest peer, for scale) | |"
    )
    mine, naive = (
        find(cells, tiny, "fold", "json", 1, top),
        find(cells, tiny, "naive", "json", 1, top),
    )
    if mine is not None:
        add(
            f"{tiny}: FoldServe p99 / p50 ({mine.p99_ms:.1f} / {mine.p50_ms:.1f} ms)",
            mine.p99_ms / mine.p50_ms if mine.p50_ms else None,
            3.0,
            higher=False,
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
    raw_big = raw[heavy][big].rate if heavy in raw else None
    add(
        f"{heavy}: batching on / raw ORT batch-{big} samples/s",
        ratio(heavy_on, raw_big),
        0.75,
        unit="%",
    )
    bound = bounds.get(heavy)
    for kind in ("binary", "json"):
        cell = find(cells, heavy, "fold", kind, 1, top)
        limit = "" if bound is None else f" ({bound.of(kind):.0%} of raw batch-{big})"
        share = None if bound is None or cell is None else bound.share(kind, cell)
        add(f"{heavy}: {kind} batch-1 share of the bound{limit}", share, 0.85, unit="%")
    add(
        f"{heavy}: binary / JSON, batch-{big} requests",
        ratio(rps(heavy, "fold", "binary", big), rps(heavy, "fold", "json", big)),
        3.0,
    )
    return lines
