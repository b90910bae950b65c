"""What bench/rollouts.py reports of each event: the requests of its window and of the
steady window before it, failures by kind (those on the socket that closed apart), answers
checked against the version they name, latency, and when capacity was back.

Everything is computed after the run from the sender's records and the times the run
marked: the window of an event runs from the event (for a cold start, the first 200 of
``/v2/health/ready``) to when capacity is back, at least ``MIN_WINDOW_S``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from open_loop_report import percentile_ms
from reliability import ATOL
from rollouts_clients import CONNECTION_LOST, OK, Record

MIN_WINDOW_S = 2.0
# Connections on a closing socket fail as it closes: a failure of CONNECTION_LOST's kinds
# on a connection opened before that, answered within this long of it, was on that socket.
CLOSING_S = 0.5
# Capacity is back once every worker listens and, from then on, every SUSTAIN_S of requests
# (stepped by STEP_S) had GOOD_SHARE of them answered 2xx within max(GOOD_FACTOR x the
# steady p99, GOOD_FLOOR_MS): goodput at the offered rate, not a backlog served late.
SUSTAIN_S, STEP_S = 1.0, 0.25
GOOD_SHARE, GOOD_FACTOR, GOOD_FLOOR_MS = 0.95, 3.0, 10.0
FIRST_AFTER_READY = 100

# (model, version, from, until): the version was unloaded (the load or unload call that
# retired it had answered) from ``from`` until loaded again
Retired = tuple[str, str, float, float]


@dataclass
class Marks:
    """What the run did and when (time.monotonic()): the steady window the event is
    compared with, the event, when its action finished (signals delivered and workers
    replaced, the call answered, readiness), and when every worker listened again."""

    event: str
    steady: tuple[float, float]
    at: float
    done: float
    listening: float
    observed: float  # the load went on until then
    closed: list[tuple[float, float]] = field(default_factory=list)  # listeners' closings
    other_from: float = math.inf  # OTHER's requests from then are racing its unload
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    model: str
    version: str
    matches: bool  # its outputs are those of the version it names


@dataclass
class EventReport:
    transport: str
    event: str
    offered_per_s: float
    steady_sent: int
    steady_p50_ms: float
    steady_p99_ms: float
    window_s: float
    sent: int
    ok: int
    failed: int
    failed_on_closing_socket: dict[str, int]
    failed_other: dict[str, int]
    mismatched: int
    unloaded_version_answers: int
    p50_ms: float
    p99_ms: float
    capacity_back_s: float | None  # None: not within the observed time
    listening_s: float  # every worker listening again, after the event
    observed_s: float
    details: dict[str, Any]


def decode(
    bodies: list[bytes], read: Any, expected: dict[tuple[str, str], np.ndarray]
) -> list[Answer]:
    """Each distinct answer body as its model, version and whether its outputs are those
    ONNX Runtime gave here for that version (an unknown version never matches)."""
    answers = []
    for body in bodies:
        try:
            model, version, out = read(body)
        except (ValueError, KeyError, IndexError, TypeError):
            answers.append(Answer("?", "?", False))
            continue
        want = expected.get((model, version))
        good = (
            want is not None
            and out.shape == want.shape
            and bool(np.allclose(out, want, rtol=0, atol=ATOL))
        )
        answers.append(Answer(model, version, good))
    return answers


def latencies(records: list[Record]) -> list[float]:
    return [r[1] - r[0] for r in records if r[4] == OK]


def on_closing_socket(r: Record, closed: list[tuple[float, float]]) -> bool:
    """A failure that met a listening socket as it closed: the connection was lost, on a
    connection opened before the socket was last seen open (unknown for gRPC: any), and
    answered while it closed."""
    if r[4] not in CONNECTION_LOST:
        return False
    opened = r[2]
    return any(
        lo - 0.05 <= r[1] <= hi + CLOSING_S and (math.isnan(opened) or opened < hi)
        for lo, hi in closed
    )


def capacity_back(main: list[Record], marks: Marks, bound_s: float) -> float | None:
    """When capacity was back (s after the event): every worker listening, and every
    ``SUSTAIN_S`` from then to the end of the observed time served at the offered rate
    (see GOOD_SHARE); None if not by then."""
    times = np.array([r[0] for r in main])
    good = np.array([r[4] == OK and r[1] - r[0] <= bound_s for r in main])
    starts = np.arange(marks.at, marks.observed - SUSTAIN_S + 1e-9, STEP_S)
    if len(starts) == 0:
        return None
    passed = []
    for w in starts:
        inside = (times >= w) & (times < w + SUSTAIN_S)
        passed.append(inside.sum() > 0 and good[inside].sum() >= GOOD_SHARE * inside.sum())
    if not passed[-1]:
        return None
    first = len(passed) - 1
    while first > 0 and passed[first - 1]:
        first -= 1
    return max(float(starts[first]), marks.listening) - marks.at


def event_report(
    transport: str,
    rate: float,
    records: list[Record],
    answers: list[Answer],
    marks: Marks,
    retired: list[Retired],
) -> EventReport:
    """One event's row; an answer from a ``retired`` version to a request sent while it
    was unloaded is one from an unloaded version."""
    steady = [r for r in records if marks.steady[0] <= r[0] < marks.steady[1]]
    steady_p99 = percentile_ms(latencies(steady), 0.99)
    bound_s = max(GOOD_FACTOR * steady_p99, GOOD_FLOOR_MS) / 1e3
    # Requests to the second model sent once its unload was are racing it: refused or not,
    # no failure (an answer from it once the unload answered is one from an unloaded version).
    racing = [r for r in records if r[3] == 1 and r[0] >= marks.other_from]
    main = [r for r in records if not (r[3] == 1 and r[0] >= marks.other_from)]
    observed = [r for r in main if marks.at <= r[0] < marks.observed]
    back = capacity_back([r for r in observed if r[3] == 0], marks, bound_s)
    end = marks.at + max(MIN_WINDOW_S, marks.observed - marks.at if back is None else back)
    window = [r for r in main if marks.at <= r[0] < min(end, marks.observed)]
    failures = [r for r in window if r[4] != OK]
    closing = Counter(r[4] for r in failures if on_closing_socket(r, marks.closed))
    other_failures = Counter(r[4] for r in failures if not on_closing_socket(r, marks.closed))
    answered = [r for r in window + racing if r[4] == OK and marks.at <= r[0] < end]
    details = dict(marks.details)
    if marks.event == "cold":
        first = sorted(r for r in main if r[0] >= marks.at and r[4] == OK)[:FIRST_AFTER_READY]
        details["first_100_p99_ms"] = percentile_ms(latencies(first), 0.99)
        before = Counter(r[4] for r in main if r[0] < marks.at)
        details["before_ready"] = dict(before.most_common())
    if racing:
        late = [r for r in racing if r[4] != OK]
        details["other_requests_racing_unload"] = len(racing)
        details["other_refused_racing_unload"] = dict(Counter(r[4] for r in late).most_common())
    return EventReport(
        transport=transport,
        event=marks.event,
        offered_per_s=rate,
        steady_sent=len(steady),
        steady_p50_ms=percentile_ms(latencies(steady), 0.5),
        steady_p99_ms=steady_p99,
        window_s=min(end, marks.observed) - marks.at,
        sent=len(window),
        ok=len(window) - len(failures),
        failed=len(failures),
        failed_on_closing_socket=dict(closing.most_common()),
        failed_other=dict(other_failures.most_common()),
        mismatched=sum(not answers[r[5]].matches for r in answered),
        unloaded_version_answers=sum(unloaded(r, answers, retired) for r in answered),
        p50_ms=percentile_ms(latencies(window), 0.5),
        p99_ms=percentile_ms(latencies(window), 0.99),
        capacity_back_s=back,
        listening_s=marks.listening - marks.at,
        observed_s=marks.observed - marks.at,
        details=details,
    )


def unloaded(r: Record, answers: list[Answer], retired: list[Retired]) -> bool:
    a = answers[r[5]]
    return any(a.model == m and a.version == v and lo <= r[0] < hi for m, v, lo, hi in retired)


def run_totals(
    records: list[Record], answers: list[Answer], retired: list[Retired]
) -> dict[str, int]:
    """Over every request of a transport's run, windows or not: answers that must not be."""
    ok = [r for r in records if r[4] == OK]
    return {
        "requests": len(records),
        "answered": len(ok),
        "mismatched": sum(not answers[r[5]].matches for r in ok),
        "unloaded_version_answers": sum(unloaded(r, answers, retired) for r in ok),
    }


# -- the table ---------------------------------------------------------------------------

HEADER = [
    "transport", "event", "offered/s", "sent", "failed", "on the closing socket",
    "other failures", "mismatched", "unloaded-version answers", "p50 ms", "p99 ms",
    "steady p99 ms", "capacity back s", "notes",
]  # fmt: skip


def kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in counts.items()) or "0"


def notes(e: EventReport) -> str:
    d = e.details
    parts = []
    if e.event == "cold":
        parts.append(f"ready {d['ready_s']:.1f} s after start")
        parts.append(f"first {FIRST_AFTER_READY} after ready: p99 {d['first_100_p99_ms']:.1f} ms")
        parts.append(f"before ready: {kinds(d['before_ready'])}")
    if "status" in d:
        parts.append(f"{d['call']} {d['status']} in {d['call_s']:.2f} s")
    if "other_requests_racing_unload" in d:
        n, refused = d["other_requests_racing_unload"], d["other_refused_racing_unload"]
        parts.append(f"{n} to {d['other']} after its unload was sent ({kinds(refused)})")
    if e.event in ("kill", "hup", "term", "cold"):
        parts.append(f"all listening after {e.listening_s:.1f} s")
    return "; ".join(parts)


def row(e: EventReport) -> list[str]:
    back = "not within" if e.capacity_back_s is None else f"{e.capacity_back_s:.1f}"
    if e.capacity_back_s is None:
        back += f" {e.observed_s:.1f}"
    return [
        e.transport, e.event, f"{e.offered_per_s:,.0f}", f"{e.sent:,}", f"{e.failed:,}",
        kinds(e.failed_on_closing_socket), kinds(e.failed_other), f"{e.mismatched}",
        f"{e.unloaded_version_answers}", f"{e.p50_ms:.1f}", f"{e.p99_ms:.1f}",
        f"{e.steady_p99_ms:.1f}", back, notes(e),
    ]  # fmt: skip


def markdown(reports: list[EventReport]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row(e)) + " |" for e in reports]
    return "\n".join(lines)
