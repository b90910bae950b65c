"""How a worker's gRPC stops: SIGTERM drains (serving, health NOT_SERVING), then grpcio's
graceful stop sends each connection a GOAWAY, so a rolling restart refuses no call; with
Triton's own client against a real `python -m service --workers 2`."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench.processes import listening_sockets
from tests.polling import poll


class GrpcCallers:
    """Threads that call without pause, each over a channel of its own (one connection, so
    one worker at a time), recording each outcome; ``keep_on``: go on after a failure."""

    def __init__(self, url: str, count: int, keep_on: bool) -> None:
        self.outcomes: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._x = triton.InferInput("x", [1, 4], "FP32")
        self._x.set_data_from_numpy(np.ones((1, 4), np.float32))
        self._threads = [
            threading.Thread(target=self._call, args=(url, keep_on)) for _ in range(count)
        ]

    def _call(self, url: str, keep_on: bool) -> None:
        with triton.InferenceServerClient(url) as client:
            while not self.stop.is_set():
                try:
                    client.infer("linear", [self._x], client_timeout=30)
                    kind = "answered"
                except InferenceServerException as err:
                    kind = str(err.status())
                with self._lock:
                    self.outcomes.append(kind)
                if kind != "answered" and not keep_on:
                    return  # the server is going: this client is done

    def __enter__(self) -> GrpcCallers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(30)

    def answered(self) -> int:
        return self.outcomes.count("answered")


def test_sigterm_drains_grpc(model_store: Any, tmp_path: Path, serve_process: Any) -> None:
    repo = model_store.copy_to(tmp_path / "models")
    with serve_process(repo, 2, "--drain-seconds", "1", grpc=True) as live:
        with GrpcCallers(live.grpc_url, 4, keep_on=False) as callers:
            poll(lambda: callers.answered() >= 20)  # under load
            live.process.send_signal(signal.SIGTERM)
            with grpc.insecure_channel(live.grpc_url) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest()
                serving = health_pb2.HealthCheckResponse.SERVING
                poll(lambda: health.Check(request, timeout=10).status != serving)  # draining
            draining = callers.answered()
            poll(lambda: callers.answered() >= draining + 20)  # still serving meanwhile
            assert live.process.wait(timeout=30) == 0
    kinds = set(callers.outcomes)
    # Calls in flight finish; then each connection gets a GOAWAY and the next call finds no
    # server (UNAVAILABLE), or grpcio cancels one it had taken but not handed on (CANCELLED).
    assert kinds <= {"answered", "StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}, kinds


def test_a_rolling_restart_moves_grpc_callers_without_refusing_a_call(
    model_store: Any, tmp_path: Path, serve_process: Any
) -> None:
    """SIGHUP: each old worker drains, then its gRPC connections get a GOAWAY and the
    callers' next calls go, on new connections, to the workers listening. None is refused
    (the old stop answered UNAVAILABLE to every call sent on a draining worker's
    connections); grpcio may cancel the calls it had taken but not handed on as the stop
    began."""
    repo = model_store.copy_to(tmp_path / "models")
    with serve_process(repo, 2, "--drain-seconds", "0.5", grpc=True) as live:
        first = set(live.worker_pids())
        with GrpcCallers(live.grpc_url, 4, keep_on=True) as callers:
            poll(lambda: callers.answered() >= 50)
            live.process.send_signal(signal.SIGHUP)
            poll(lambda: not first & set(live.worker_pids()), limit=60)
            poll(lambda: listening_sockets(live.grpc_port) == 2)
            replaced = callers.answered()
            poll(lambda: callers.answered() >= replaced + 50)
    failed = [kind for kind in callers.outcomes if kind != "answered"]
    assert set(failed) <= {"StatusCode.CANCELLED"}, failed
    # A few per worker stopped (a caller may send again on the old connection before its
    # GOAWAY arrives); the refusals of the old stop were hundreds.
    assert len(failed) <= 0.02 * len(callers.outcomes), (len(failed), len(callers.outcomes))
