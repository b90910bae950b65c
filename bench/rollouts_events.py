"""The events of bench/rollouts.py, each done to a running server under load, each after a
steady window (but a cold start, whose steady window comes after it), each marking when it
happened, when its action finished and when every worker listened again."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from rollouts_clients import REQUEST_TIMEOUT_S
from rollouts_report import MIN_WINDOW_S, Marks, Retired
from rollouts_server import (
    MODEL,
    OTHER,
    Repository,
    Server,
    SocketWatch,
    first_ready,
    manage,
    ready_versions,
    wait_for,
)

PROBE_SHARE = 0.1  # of the requests go to the model unloaded, from its steady window on
WAIT_S = 180.0  # the longest any event's action may take
WARMUP_S = 1.0  # of load after a pause, before a steady window


@dataclass
class Roll:
    """One transport's run on one server: what the events need, and what they marked."""

    server: Server
    watch: SocketWatch
    repo: Repository
    seconds: float
    control: Any  # the sender's Control (rollouts_clients.py)
    marks: list[Marks] = field(default_factory=list)
    retired: list[Retired] = field(default_factory=list)

    def steady(self) -> tuple[float, float]:
        """The steady window before an event: a cold start's, just measured, else a new one
        once settled."""
        if self.marks and self.marks[-1].event == "cold":
            return self.marks[-1].steady
        self.settle()
        start = time.monotonic()
        return start, pause_until(start + self.seconds)

    def settle(self) -> None:
        """No sends until every request out is answered, then WARMUP_S of load again, so
        that each event starts from the steady state, not from the last one's backlog."""
        self.control.paused.value = 1

        def answered() -> bool:
            return bool(self.control.in_flight.value == 0)

        wait_for(answered, REQUEST_TIMEOUT_S + 5, "every request out answered", self.server)
        self.control.paused.value = 0
        pause_until(time.monotonic() + WARMUP_S)

    def observe(
        self,
        event: str,
        steady: tuple[float, float],
        at: float,
        done: float,
        listening: float,
        **details: Any,
    ) -> Marks:
        """The load goes on ``seconds`` (at least MIN_WINDOW_S) after the action; then the
        event's marks, with the listening sockets that closed meanwhile."""
        observed = pause_until(max(done, listening) + max(MIN_WINDOW_S, self.seconds))
        closed = self.watch.closed_sockets(at, observed)
        marks = Marks(event, steady, at, done, listening, observed, closed, details=details)
        self.marks.append(marks)
        return marks

    def retire_gone(self, before: set[tuple[str, str]], at: float) -> None:
        """Versions READY ``before`` and no longer are: unloaded from ``at`` on."""
        gone = before - ready_versions(self.server.url)
        self.retired += [(m, v, at, float("inf")) for m, v in sorted(gone)]


def pause_until(moment: float) -> float:
    """Let the load run until ``moment``: the window is the time itself, not an ordering."""
    time.sleep(max(0.0, moment - time.monotonic()))
    return time.monotonic()


def cold(roll: Roll) -> None:
    """The server was started with the load already on: the event is its first readiness."""
    server, watch = roll.server, roll.watch
    at = first_ready(server, WAIT_S)
    listening = wait_for(watch.all_listening, WAIT_S, "every worker listening", server)
    marks = roll.observe("cold", (0.0, 0.0), at, at, listening, ready_s=at - server.started)
    roll.settle()
    start = time.monotonic()
    marks.steady = (start, pause_until(start + roll.seconds))


def kill(roll: Roll) -> None:
    steady = roll.steady()
    victim = roll.server.worker_pids()[0]
    at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    back = partial(roll.watch.all_listening, frozenset([victim]))
    listening = wait_for(back, WAIT_S, "a worker in place of the killed one", roll.server)
    roll.observe("kill", steady, at, listening, listening, worker=victim)


def load_version(roll: Roll) -> None:
    """The next version of MODEL renamed into the repository, then loaded."""
    steady = roll.steady()
    before = ready_versions(roll.server.url)
    version = roll.repo.publish_next()
    at = time.monotonic()
    status, text = manage(roll.server.url, MODEL, "load")
    done = time.monotonic()
    roll.retire_gone(before, done)
    details = {"call": "load", "status": status, "call_s": done - at, "version": version}
    details |= {} if status == 200 else {"answer": text}
    roll.observe("load", steady, at, done, at, **details)


def unload_other(roll: Roll) -> None:
    """OTHER unloaded, ``PROBE_SHARE`` of the requests going to it from its steady window
    on (loaded again first where an earlier run on this server unloaded it)."""
    url = roll.server.url
    if not any(m == OTHER for m, _ in ready_versions(url)):
        again = time.monotonic()
        status, text = manage(url, OTHER, "load")
        if status != 200:
            raise RuntimeError(f"{OTHER} cannot be loaded again: {status} {text}")
        roll.retired = [
            (m, v, lo, min(hi, again) if m == OTHER else hi) for m, v, lo, hi in roll.retired
        ]
    roll.settle()
    roll.control.other_share.value = PROBE_SHARE
    start = time.monotonic()
    steady = (start, pause_until(start + roll.seconds))
    before = ready_versions(url)
    at = time.monotonic()
    status, text = manage(url, OTHER, "unload")
    done = time.monotonic()
    roll.retire_gone(before, done)
    details = {"call": "unload", "status": status, "call_s": done - at, "other": OTHER}
    details |= {} if status == 200 else {"answer": text}
    marks = roll.observe("unload", steady, at, done, at, **details)
    marks.other_from = at
    roll.control.other_share.value = 0.0


def hup(roll: Roll) -> None:
    """SIGHUP to the supervisor: it replaces every worker, one at a time."""
    steady = roll.steady()
    old = frozenset(roll.server.worker_pids())
    at = time.monotonic()
    os.kill(roll.server.pid, signal.SIGHUP)
    back = partial(roll.watch.all_listening, old)
    listening = wait_for(back, WAIT_S, "every worker replaced after SIGHUP", roll.server)
    roll.observe("hup", steady, at, listening, listening)


def term(roll: Roll) -> None:
    """SIGTERM to each worker in turn, the next once the supervisor's replacement listens."""
    steady = roll.steady()
    at = listening = time.monotonic()
    for pid in roll.server.worker_pids():
        os.kill(pid, signal.SIGTERM)
        back = partial(roll.watch.all_listening, frozenset([pid]))
        listening = wait_for(back, WAIT_S, f"a worker in place of {pid}", roll.server)
    roll.observe("term", steady, at, listening, listening)


ACTIONS: dict[str, Callable[[Roll], None]] = {
    "cold": cold,
    "kill": kill,
    "load": load_version,
    "unload": unload_other,
    "hup": hup,
    "term": term,
}
EVENTS = tuple(ACTIONS)
