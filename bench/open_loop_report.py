"""What bench/open_loop.py reports: each sender's tally, a cell's summary of them, the
server's drops read from ``/metrics``, and the printed rows."""

from __future__ import annotations

import re
import urllib.error
from dataclasses import dataclass, field

import throughput_servers as servers
from open_loop_clients import Outcome

DROPPED = re.compile(r"^foldserve_requests_dropped_total\{([^}]*)\}\s+(\S+)", re.MULTILINE)
REASON = re.compile(r'reason="([^"]*)"')


@dataclass
class SenderTally:
    """What one sender saw of the requests scheduled in its counted window."""

    scheduled: int = 0
    sent: int = 0
    sent_all: int = 0  # warm-up included: what cpu_s was spent on
    late: int = 0
    client_dropped: int = 0  # not sent: max_in_flight already out
    ok_s: list[float] = field(default_factory=list)  # 2xx latencies from scheduled send
    refused: int = 0
    expired: int = 0
    errors: int = 0
    first_error: str = ""
    cpu_s: float = 0.0  # this process, all its threads, from first send to drained
    wall_s: float = 0.0

    def record(self, outcome: Outcome, latency_s: float, message: str) -> None:
        if outcome is Outcome.OK:
            self.ok_s.append(latency_s)
        elif outcome is Outcome.REFUSED:
            self.refused += 1
        elif outcome is Outcome.EXPIRED:
            self.expired += 1
        else:
            self.errors += 1
            self.first_error = self.first_error or message


@dataclass(frozen=True)
class Cell:
    """One offered rate: rates per second of the counted window, shares of the requests
    scheduled in it, latencies of its 2xx answers in ms from their scheduled send."""

    offered: float
    sent_per_s: float
    ok_per_s: float
    goodput_per_s: float  # 2xx within the target (every 2xx without one)
    p50_ms: float
    p99_ms: float
    refused: float
    expired: float
    errors: float
    first_error: str
    client_dropped: int
    late_sends: int
    sender_cores: float  # CPU seconds per second, all senders together
    sender_cpu_us: float  # per request sent
    server_dropped: dict[str, float] | None  # by reason; None: the server has no counter


def percentile_ms(values: list[float], q: float) -> float:
    """Nearest-rank ``q`` quantile of latencies in s, in ms (NaN for none)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def summarize(
    offered: float,
    duration: float,
    tallies: list[SenderTally],
    target_s: float | None,
    server_dropped: dict[str, float] | None,
) -> Cell:
    """The senders' tallies of one cell as its row."""
    ok = [s for t in tallies for s in t.ok_s]
    scheduled = max(1, sum(t.scheduled for t in tallies))
    cpu = sum(t.cpu_s for t in tallies)
    return Cell(
        offered=offered,
        sent_per_s=sum(t.sent for t in tallies) / duration,
        ok_per_s=len(ok) / duration,
        goodput_per_s=sum(target_s is None or s <= target_s for s in ok) / duration,
        p50_ms=percentile_ms(ok, 0.5),
        p99_ms=percentile_ms(ok, 0.99),
        refused=sum(t.refused for t in tallies) / scheduled,
        expired=sum(t.expired for t in tallies) / scheduled,
        errors=sum(t.errors for t in tallies) / scheduled,
        first_error=next((t.first_error for t in tallies if t.first_error), ""),
        client_dropped=sum(t.client_dropped for t in tallies),
        late_sends=sum(t.late for t in tallies),
        sender_cores=cpu / max([t.wall_s for t in tallies] + [1e-9]),
        sender_cpu_us=cpu / max(1, sum(t.sent_all for t in tallies)) * 1e6,
        server_dropped=server_dropped,
    )


def dropped_by_reason(metrics: str, model: str) -> dict[str, float] | None:
    """``model``'s ``foldserve_requests_dropped_total`` in a /metrics text, summed by reason
    over its versions; None where the server exports no such counter."""
    if "foldserve_requests_dropped" not in metrics:
        return None
    totals: dict[str, float] = {}
    for labels, value in DROPPED.findall(metrics):
        reason = REASON.search(labels)
        if f'model="{model}"' in labels and reason:
            totals[reason[1]] = totals.get(reason[1], 0.0) + float(value)
    return totals


def scrape_dropped(url: str, model: str) -> dict[str, float] | None:
    try:
        text = servers.post(url + "/metrics", None, {}, 10.0).decode()
    except (urllib.error.URLError, OSError):
        return None
    return dropped_by_reason(text, model)


def delta(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, float] | None:
    """What each reason's count rose by (a reason new in ``after`` from 0); None without
    a counter after."""
    if after is None:
        return None
    rises = {k: v - (before or {}).get(k, 0.0) for k, v in sorted(after.items())}
    return {k: rise for k, rise in rises.items() if rise}


HEADER = [
    "offered/s", "sent/s", "2xx/s", "good/s", "p50 ms", "p99 ms", "refused", "expired",
    "errors", "client drops", "late sends", "sender cores", "sender us/req", "server drops",
]  # fmt: skip
WIDTHS = [10, 8, 8, 8, 8, 8, 8, 8, 7, 13, 11, 13, 14, 0]


def row(cell: Cell) -> list[str]:
    drops = "n/a" if cell.server_dropped is None else "none"
    drops = ", ".join(f"{k} {v:,.0f}" for k, v in (cell.server_dropped or {}).items()) or drops
    return [
        f"{cell.offered:,.0f}", f"{cell.sent_per_s:,.0f}", f"{cell.ok_per_s:,.0f}",
        f"{cell.goodput_per_s:,.0f}", f"{cell.p50_ms:.1f}", f"{cell.p99_ms:.1f}",
        f"{cell.refused:.1%}", f"{cell.expired:.1%}", f"{cell.errors:.1%}",
        f"{cell.client_dropped:,}", f"{cell.late_sends:,}", f"{cell.sender_cores:.2f}",
        f"{cell.sender_cpu_us:,.0f}", drops,
    ]  # fmt: skip


def text_line(cells: list[str]) -> str:
    return "".join(c.rjust(w) if w else f"  {c}" for c, w in zip(cells, WIDTHS, strict=True))
