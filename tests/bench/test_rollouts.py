"""bench/rollouts.py --quick on a killed worker and a new version, REST with a new connection
per request (the other events and transports take minutes: the full run records them).

Whatever the server does under them, no answer may be unlike the version it names or come
from a version already unloaded, every request scheduled is counted once, and the report
has each event asked for, with every figure. How many requests fail is the server's to
improve, and is recorded, not asserted, here. Also the report's own rules, on records made
up for them: which failures met the closing socket, and when capacity was back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from tests.bench.scripts import bench_module, run_script

EVENTS = ["kill", "load"]
FIELDS = {
    "transport", "event", "offered_per_s", "steady_sent", "steady_p50_ms", "steady_p99_ms",
    "window_s", "sent", "ok", "failed", "failed_on_closing_socket", "failed_other",
    "mismatched", "unloaded_version_answers", "p50_ms", "p99_ms", "capacity_back_s",
    "listening_s", "observed_s", "details",
}  # fmt: skip


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("rollouts")
    out = tmp / "rollouts.json"
    done = run_script(
        "rollouts.py", "--quick", "--events", ",".join(EVENTS), "--transport", "rest-new",
        "--json", str(out), "--workdir", str(tmp / "work"),
    )  # fmt: skip
    assert "| rest-new | kill |" in done.stdout and "| rest-new | load |" in done.stdout
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_every_event_asked_for_is_reported_with_every_figure(figures: dict[str, Any]) -> None:
    assert [(e["transport"], e["event"]) for e in figures["events"]] == [
        ("rest-new", event) for event in EVENTS
    ]
    for event in figures["events"]:
        assert set(event) == FIELDS
        assert event["window_s"] >= 2.0  # at least 2 s, until capacity is back
        assert event["steady_p99_ms"] > 0 and event["p99_ms"] >= event["p50_ms"] > 0
    assert figures["capacity_per_s"]["rest-new"] > 0


def test_no_answer_is_wrong_or_from_an_unloaded_version(figures: dict[str, Any]) -> None:
    for event in figures["events"]:
        assert event["mismatched"] == 0, event
        assert event["unloaded_version_answers"] == 0, event
    totals = figures["totals"]["rest-new"]
    assert totals["mismatched"] == 0 and totals["unloaded_version_answers"] == 0
    assert totals["answered"] > 0


def test_requests_are_counted_once_at_the_offered_rate(figures: dict[str, Any]) -> None:
    for event in figures["events"]:
        failures = sum(event["failed_on_closing_socket"].values())
        failures += sum(event["failed_other"].values())
        assert event["failed"] == failures
        assert event["ok"] + event["failed"] == event["sent"]
        # Poisson arrivals at the offered rate: a wide bound (the sender may fall behind)
        expected = event["offered_per_s"] * event["window_s"]
        assert 0.6 * expected < event["sent"] < 1.3 * expected, event


def test_the_load_answered_and_the_kill_was_seen(figures: dict[str, Any]) -> None:
    kill, load = figures["events"]
    assert kill["listening_s"] > 0  # a worker was gone, then back
    assert load["details"]["status"] == 200 and load["details"]["version"] == 2


@pytest.fixture(scope="module")
def report() -> Iterator[ModuleType]:
    """bench/rollouts_report.py, imported by its bare name as the script imports it."""
    with bench_module("rollouts_report") as module:
        yield module


NAN = math.nan


@pytest.mark.parametrize(
    ("record", "closing"),
    [
        ((9.0, 10.05, 5.0, 0, "reset", -1), True),  # opened before, lost as it closed
        ((9.0, 10.05, NAN, 0, "gRPC UNAVAILABLE (reset)", -1), True),  # gRPC: no open time
        ((10.2, 10.3, 10.25, 0, "reset", -1), False),  # opened after the socket was gone
        ((9.0, 11.0, 5.0, 0, "closed", -1), False),  # lost long after
        ((9.0, 10.05, 5.0, 0, "HTTP 503", -1), False),  # an answer, not a lost connection
        ((9.0, 10.05, NAN, 0, "refused", -1), False),
    ],
)
def test_failures_on_the_closing_socket(
    report: ModuleType, record: tuple[Any, ...], closing: bool
) -> None:
    """A listening socket last seen open at 10.0, gone at 10.1."""
    assert report.on_closing_socket(record, [(10.0, 10.1)]) is closing


def test_capacity_is_back_once_listening_and_served_at_the_rate(report: ModuleType) -> None:
    """100 req/s from 0 to 6 s: up to 2 s each answer takes 1 s, then 1 ms; every worker
    listens from 3 s: capacity is back at 3 s (the later of the two)."""
    took = [1.0 if t < 200 else 0.001 for t in range(600)]
    records = [(t / 100, t / 100 + s, NAN, 0, "2xx", 0) for t, s in enumerate(took)]
    marks = report.Marks("kill", (0.0, 0.0), 0.0, 3.0, 3.0, 6.0)
    assert report.capacity_back(records, marks, 0.010) == pytest.approx(3.0)
    late = report.Marks("kill", (0.0, 0.0), 0.0, 1.0, 1.0, 6.0)
    assert report.capacity_back(records, late, 0.010) == pytest.approx(2.0)
    never = [(r[0], r[0] + 1.0, *r[2:]) for r in records]
    assert report.capacity_back(never, late, 0.010) is None
