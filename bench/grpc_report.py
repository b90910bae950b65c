"""The tables of bench/grpc_throughput.py: its cells, one table per model and batch, the targets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cell:
    row: str  # the server and transport
    model: str
    batch: int
    in_flight: int
    sent: int  # requests the load generator completed
    answered: int  # ... of which got an answer (gRPC: a message; REST: a 2xx)
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float  # server CPU per answered request
    other_cores: float  # CPUs busy with anything but the server and the load generator
    server_ok: int | None = None  # FoldServe's own count of the requests it served
    requests_per_call: float | None = None  # FoldServe: requests per ONNX Runtime call
    max_diff: float | None = None  # largest |answer - ONNX Runtime| of the checking calls

    @property
    def rate(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    @property
    def samples(self) -> float:
        return self.rate * self.batch


def cell_line(cell: Cell) -> str:
    return (
        f"{cell.row:24} {cell.model:13} b{cell.batch:<3} @{cell.in_flight:<3} "
        f"{cell.rate:9,.0f} req/s {cell.samples:10,.0f} samples/s "
        f"p50 {cell.p50_ms:7.1f} p99 {cell.p99_ms:7.1f} ms  answered {cell.answered}/{cell.sent}"
    )


def tables(cells: list[Cell], groups: list[tuple[str, int]], in_flight: list[int]) -> list[str]:
    """One table per model and batch: a row per server and transport, a column per calls
    in flight."""
    lines: list[str] = []
    for model, batch in groups:
        group = [c for c in cells if (c.model, c.batch) == (model, batch)]
        if not group:
            continue
        rows = list(dict.fromkeys(c.row for c in group))
        lines += [f"**{model}, batch {batch}** (req/s, samples/s, p50 / p99 ms)", ""]
        head = [f"{n} in flight" for n in in_flight]
        busy = " / ".join(str(n) for n in in_flight)
        head += [
            f"server CPU us/req @{in_flight[-1]}",
            f"other CPUs busy @{busy}",
            "answered / sent",
        ]
        head += ["counted by FoldServe", f"FoldServe requests per ORT call @{busy}"]
        lines += ["| server | " + " | ".join(head) + " | max abs diff |"]
        lines += ["|---" * (len(head) + 2) + "|"]
        for row in rows:
            mine = {c.in_flight: c for c in group if c.row == row}
            cols = [
                f"{c.rate:,.0f}, {c.samples:,.0f}, {c.p50_ms:.1f} / {c.p99_ms:.1f}"
                if (c := mine.get(n))
                else "-"
                for n in in_flight
            ]
            last = mine.get(in_flight[-1])
            cols.append(f"{last.server_cpu_us:,.0f}" if last else "-")
            cols.append(
                " / ".join(f"{c.other_cores:.2f}" if (c := mine.get(n)) else "-" for n in in_flight)
            )
            answered, sent = (
                sum(getattr(c, k) for c in mine.values()) for k in ("answered", "sent")
            )
            cols.append(f"{answered:,} / {sent:,}")
            counted = [c.server_ok for c in mine.values() if c.server_ok is not None]
            cols.append(f"{sum(counted):,}" if counted else "-")
            per_call = [mine[n].requests_per_call if n in mine else None for n in in_flight]
            cols.append(
                " / ".join(f"{r:.1f}" if r is not None else "-" for r in per_call)
                if any(r is not None for r in per_call)
                else "-"
            )
            diffs = [c.max_diff for c in mine.values() if c.max_diff is not None]
            cols.append(f"{max(diffs):.1e}" if diffs else "-")
            lines.append(f"| {row} | " + " | ".join(cols) + " |")
        lines.append("")
    return lines


def find(cells: list[Cell], row: str, model: str, batch: int, in_flight: int) -> Cell | None:
    for cell in cells:
        if (cell.row, cell.model, cell.batch, cell.in_flight) == (row, model, batch, in_flight):
            return cell
    return None


def target(name: str, ratio: float, goal: float | None) -> str:
    """One row of the targets' table; ``goal`` None: shown for scale, no target."""
    if goal is None:
        return f"| {name} | {ratio:.2f}x | (no target) | |"
    return f"| {name} | {ratio:.2f}x | >= {goal:g}x | {'PASS' if ratio >= goal else 'MISS'} |"


def ratios(cells: list[Cell], in_flight: list[int]) -> list[str]:
    """The targets: FoldServe's gRPC against the floor and the best peer (digits_cnn, batch 1,
    the most calls in flight), and against its own REST binary tensors (resnet_bench, batch
    32, samples/s, every number of calls in flight)."""
    lines = ["| target | measured | goal | |", "|---|---|---|---|"]
    n = max(in_flight)
    fold = find(cells, "FoldServe gRPC", "digits_cnn", 1, n)
    floor = find(cells, "gRPC floor gRPC", "digits_cnn", 1, n)
    peers = [find(cells, f"{p} gRPC", "digits_cnn", 1, n) for p in ("MLServer", "KServe")]
    best = max((p for p in peers if p), key=lambda c: c.rate, default=None)
    if fold and floor:
        lines.append(
            target(f"digits_cnn b1 @{n}: FoldServe gRPC / gRPC floor", fold.rate / floor.rate, 0.8)
        )
    if fold and best:
        name = f"digits_cnn b1 @{n}: FoldServe gRPC / best peer ({best.row})"
        lines.append(target(name, fold.rate / best.rate, 3.0))
    for k in in_flight:
        mine = find(cells, "FoldServe gRPC", "resnet_bench", 32, k)
        rest = find(cells, "FoldServe REST binary", "resnet_bench", 32, k)
        if mine and rest:
            name = f"resnet_bench b32 @{k}: FoldServe gRPC / REST binary, samples/s"
            lines.append(target(name, mine.samples / rest.samples, 1.0))
    for k in in_flight:
        mine = find(cells, "FoldServe gRPC", "digits_cnn", 1, k)
        rest = find(cells, "FoldServe REST binary", "digits_cnn", 1, k)
        if mine and rest:
            name = f"digits_cnn b1 @{k}: FoldServe gRPC / REST binary, req/s"
            lines.append(target(name, mine.rate / rest.rate, None))
    if len(lines) == 2:
        return ["(no target's cells were measured: FoldServe's gRPC is not in this run)"]
    return lines
