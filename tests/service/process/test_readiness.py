"""Readiness that tells the truth: a worker listens only once its models are loaded.

Real servers (``python -m service``) whose loads the test holds: a ``sitecustomize``
module on the server's PYTHONPATH (loaded by every process Python starts, the
spawned workers included) makes ``ModelRepository.load_all`` wait until the test
opens a gate file, after writing a marker that says which process waits. While a
worker is held, the test checks what clients see; nothing is timed by sleeping.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.processes import free_port, listening_sockets
from tests.polling import poll
from tests.servers import ServerProcess

HOLD_MODULE = """
import os, pathlib, time
gate = os.environ.get("FOLDSERVE_TEST_LOAD_GATE")
if gate:
    import service.models.repository as repository
    load_all = repository.ModelRepository.load_all
    def held(self, *args, **kwargs):
        gate_dir = pathlib.Path(gate)
        (gate_dir / f"waiting-{os.getpid()}").touch()
        while not (gate_dir / "open").exists():  # the server's side: a poll, bounded below
            time.sleep(0.01)
        (gate_dir / f"loading-{os.getpid()}").touch()
        return load_all(self, *args, **kwargs)
    repository.ModelRepository.load_all = held
"""

CLIENTS = 3  # threads sending one request after another, each on a new connection
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@dataclass
class Gate:
    """The load gate of a server's processes: closed, every load waits at its start."""

    root: Path

    def open(self) -> None:
        (self.root / "open").touch()

    def close(self) -> None:
        (self.root / "open").unlink(missing_ok=True)

    def waiting(self) -> set[int]:
        """The processes that reached the gate (and may have passed it since)."""
        return {int(p.name.split("-")[1]) for p in self.root.glob("waiting-*")}

    def passed(self) -> set[int]:
        return {int(p.name.split("-")[1]) for p in self.root.glob("loading-*")}


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    root = tmp_path / "gate"
    root.mkdir()
    (tmp_path / "hold").mkdir()
    (tmp_path / "hold" / "sitecustomize.py").write_text(HOLD_MODULE)
    return Gate(root)


def held_env(gate: Gate) -> dict[str, str]:
    path = [str(gate.root.parent / "hold"), os.environ.get("PYTHONPATH", "")]
    return {
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        "FOLDSERVE_TEST_LOAD_GATE": str(gate.root),
    }


def port_of(server: ServerProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def live(port: int) -> dict[str, Any]:
    answer = httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=10)
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


@dataclass
class Traffic:
    """Client threads that send infer requests without pause, each on a new connection,
    recording every outcome with the moment it came."""

    url: str
    answers: list[tuple[float, int]] = field(default_factory=list)  # (time, status)
    failures: list[tuple[float, str]] = field(default_factory=list)  # (time, error)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self.url, timeout=30, limits=limits) as client:
            while not self.stop.is_set():
                try:
                    status = client.post("/v2/models/linear/infer", json=BODY).status_code
                except httpx.TransportError as err:
                    self.failures.append((time.monotonic(), type(err).__name__))
                else:
                    self.answers.append((time.monotonic(), status))

    def answered_since(self, moment: float) -> int:
        return sum(1 for t, status in self.answers if t > moment and status == 200)

    def statuses(self) -> set[int]:
        return {status for _, status in self.answers}


@contextmanager
def traffic(url: str) -> Iterator[Traffic]:
    load = Traffic(url)
    threads = [threading.Thread(target=load.run, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        yield load
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(timeout=60)


def test_no_worker_listens_before_its_models_are_loaded(
    build: Any, tmp_path: Path, serve_process: Any, gate: Gate
) -> None:
    """At cold start: connections refused (REST and gRPC) while every worker loads, the
    supervisor's health port alive meanwhile; then every worker listens, and the first
    inference is answered."""
    build.write_version(tmp_path / "repo", "linear", 1, build.linear_model(4, 5))
    health = free_port()
    flags = ("--health-port", str(health))
    with serve_process(
        tmp_path / "repo", 2, *flags, grpc=True, ready=False, **held_env(gate)
    ) as server:
        port = port_of(server)
        poll(lambda: len(gate.waiting() & set(server.worker_pids())) == 2, limit=60)
        assert refused(port) and listening_sockets(port) == 0
        assert listening_sockets(server.grpc_port) == 0
        assert live(health) == {"live": True}
        gate.open()
        poll(lambda: listening_sockets(port) == 2 and listening_sockets(server.grpc_port) == 2)
        assert server.client.get("/v2/health/ready").json() == {"ready": True}
        answer = server.client.post("/v2/models/linear/infer", json=BODY)
        assert answer.status_code == 200 and answer.json()["model_version"] == "1"


def test_a_lone_worker_answers_liveness_on_its_health_port_while_it_loads(
    build: Any, tmp_path: Path, serve_process: Any, gate: Gate
) -> None:
    """One worker, no supervisor: its health port is answered by a thread that checks its
    event loop turns, which a load (in a thread of its own) does not hold."""
    build.write_version(tmp_path / "repo", "linear", 1, build.linear_model(4, 5))
    health = free_port()
    with serve_process(
        tmp_path / "repo", 1, "--health-port", str(health), ready=False, **held_env(gate)
    ) as server:
        poll(lambda: server.process.pid in gate.waiting(), limit=60)
        assert refused(port_of(server))
        assert live(health) == {"live": True}
        missing = httpx.get(f"http://127.0.0.1:{health}/v2/health/ready", timeout=10)
        assert missing.status_code == 404 and "/v2/health/live" in missing.json()["error"]
        gate.open()
        poll(lambda: listening_sockets(port_of(server)) == 1)
        assert server.client.post("/v2/models/linear/infer", json=BODY).status_code == 200


def test_a_killed_workers_replacement_takes_no_connection_until_it_has_loaded(
    build: Any, tmp_path: Path, serve_process: Any, gate: Gate
) -> None:
    """SIGKILL a worker under load on new connections: its replacement, held in its load,
    does not listen; the other worker answers every request meanwhile (no 503 "still
    loading", as a worker listening before its load gave). Only the requests open on the
    killed worker as it died fail, and none after its replacement has started."""
    build.write_version(tmp_path / "repo", "linear", 1, build.linear_model(4, 5))
    gate.open()
    with serve_process(tmp_path / "repo", 2, **held_env(gate)) as server:
        port = port_of(server)
        poll(lambda: listening_sockets(port) == 2)
        gate.close()
        with traffic(server.url) as load:
            poll(lambda: load.answered_since(0) >= 50)
            victim, survivor = server.worker_pids()
            os.kill(victim, signal.SIGKILL)
            poll(lambda: bool(set(server.worker_pids()) - {victim, survivor} & gate.waiting()))
            replaced = time.monotonic()
            poll(lambda: load.answered_since(replaced) >= 100)  # served while it loads
            assert listening_sockets(port) == 1
            gate.open()
            poll(lambda: listening_sockets(port) == 2)
            back = time.monotonic()
            poll(lambda: load.answered_since(back) >= 100)
        assert load.statuses() == {200}, sorted(load.statuses())
        # Lost with the killed worker: requests in flight on it, and connections in its
        # socket's queue while it died (a client may lose more than one in that moment).
        moments = [t for t, _ in load.failures]
        assert not moments or max(moments) - min(moments) < 1.0, load.failures
        assert all(t < replaced for t in moments), (load.failures, replaced)


def test_sighup_replaces_the_workers_one_at_a_time_without_a_failure(
    build: Any, tmp_path: Path, serve_process: Any, gate: Gate
) -> None:
    """A rolling restart: each replacement loads (held here) while the old workers serve
    on, and an old worker stops (draining) only once its replacement listens. The
    supervisor stays alive on the health port through the held load."""
    build.write_version(tmp_path / "repo", "linear", 1, build.linear_model(4, 5))
    gate.open()
    health = free_port()
    flags = ("--health-port", str(health), "--drain-seconds", "0.5")
    with serve_process(tmp_path / "repo", 2, *flags, **held_env(gate)) as server:
        port = port_of(server)
        first = set(server.worker_pids())
        gate.close()
        with traffic(server.url) as load:
            poll(lambda: load.answered_since(0) >= 50)
            server.process.send_signal(signal.SIGHUP)
            poll(lambda: bool(gate.waiting() - first - gate.passed()), limit=60)
            held = time.monotonic()
            poll(lambda: load.answered_since(held) >= 100)
            assert set(server.worker_pids()) >= first and listening_sockets(port) == 2
            assert live(health) == {"live": True}
            gate.open()
            poll(lambda: not first & set(server.worker_pids()), limit=60)
            poll(lambda: listening_sockets(port) == 2)
            done = time.monotonic()
            poll(lambda: load.answered_since(done) >= 50)
        assert load.statuses() == {200} and load.failures == [], (load.statuses(), load.failures)
