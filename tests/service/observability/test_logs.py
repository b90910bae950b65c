"""Access logs and request ids: parseable lines with the right fields, ids unique everywhere,
nothing lost at shutdown, and the collector's start-up freeze."""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.observability import logs
from service.observability.logs import LogWriter, configure_logging, new_request_id
from tests.polling import poll

GENERATED_ID = re.compile(r"[0-9a-f]{16}-[0-9a-f]+")
TEXT_ACCESS = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO service\.access "
    r'\[(?P<request_id>[^\]]+)\] "(?P<method>[A-Z]+) (?P<path>\S+)" (?P<status>\d{3}) '
    r"(?P<ms>\d+\.\d\d)ms"
)
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@pytest.fixture
def log_stream() -> Iterator[Any]:
    """``configure(format) -> stream``: this process's logging through a LogWriter on a
    StringIO, restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logs._writer)

    def configure(log_format: str) -> io.StringIO:
        stream = io.StringIO()
        configure_logging(log_format, "info", stream)
        return stream

    yield configure
    if logs._writer is not None and logs._writer is not saved[2]:
        logs._writer.stop()
    root.handlers[:], logs._writer = saved[0], saved[2]
    root.setLevel(saved[1])


def infer_ids(server: Any, count: int) -> list[str]:
    """``count`` digits requests to the shared server; the ids it answered with."""
    body = {
        "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 64}]
    }
    with server.client() as client:
        answers = [client.post("/v2/models/digits_cnn/infer", json=body) for _ in range(count)]
    assert all(r.status_code == 200 for r in answers)
    return [r.headers["x-request-id"] for r in answers]


def test_text_access_lines_parse_with_every_field(server: Any, log_stream: Any) -> None:
    stream = log_stream("text")
    ids = infer_ids(server, 20)
    logs.flush_logs()
    lines = [TEXT_ACCESS.fullmatch(line) for line in stream.getvalue().splitlines()]
    access = [m for m in lines if m is not None and m["path"] == "/v2/models/digits_cnn/infer"]
    assert [m["request_id"] for m in access] == ids
    assert all(m["method"] == "POST" and m["status"] == "200" for m in access)
    assert all(float(m["ms"]) > 0 for m in access)


def test_json_access_lines_parse_with_every_field(server: Any, log_stream: Any) -> None:
    stream = log_stream("json")
    start = time.perf_counter()
    ids = infer_ids(server, 20)
    with server.client() as client:
        assert client.get("/v2/models/nope", headers={"X-Request-ID": "given:1"}).status_code == 404
    client_ms = (time.perf_counter() - start) * 1e3
    logs.flush_logs()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "service.access"]
    assert [line["request_id"] for line in access] == [*ids, "given:1"]
    for line, status in zip(access, [200] * 20 + [404], strict=True):
        assert line["level"] == "INFO" and line["status"] == status
        assert line["method"] in ("POST", "GET") and line["path"].startswith("/v2/models/")
        assert line["duration_ms"] > 0 and line["time"].endswith("+00:00")
        assert line["message"] == (
            f'"{line["method"]} {line["path"]}" {status} {line["duration_ms"]:.2f}ms'
        )
    # One request after another: their server-side times fit in the time the client waited.
    assert sum(line["duration_ms"] for line in access) <= client_ms


def test_other_lines_keep_their_request_id_and_traceback(log_stream: Any) -> None:
    stream = log_stream("json")
    token = logs.request_id_var.set("rid-7")
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("service.test").exception("failed on %s", "x")
    finally:
        logs.request_id_var.reset(token)
    logs.flush_logs()
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert line["message"] == "failed on x" and line["request_id"] == "rid-7"
    assert line["level"] == "ERROR" and "ValueError: boom" in line["exc_info"]


def test_a_level_above_info_writes_no_access_line(server: Any, log_stream: Any) -> None:
    stream = log_stream("text")
    logging.getLogger().setLevel("WARNING")
    infer_ids(server, 3)
    logs.flush_logs()
    assert "service.access" not in stream.getvalue()


def test_the_writer_flushes_every_queued_line_when_stopped() -> None:
    stream = io.StringIO()
    writer = LogWriter(stream, "text")
    for i in range(5000):
        writer.access("POST", f"/p/{i}", 200, 0.5, str(i))
    writer.stop()
    lines = stream.getvalue().splitlines()
    assert [TEXT_ACCESS.fullmatch(line)["request_id"] for line in lines] == [  # type: ignore[index]
        str(i) for i in range(5000)
    ]


def test_a_forked_child_writes_its_lines_with_a_writer_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    with path.open("w") as stream:
        writer = LogWriter(stream, "text")
        writer.access("GET", "/parent", 200, 0.5, "p")
        pid = os.fork()
        if pid == 0:  # the child: its own thread writes, without an exit handler's help
            code = 1
            try:  # whatever happens, the child never returns into pytest
                writer.access("GET", "/child", 200, 0.5, "c")
                poll(lambda: "/child" in path.read_text(), limit=10)
                code = 0
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, "no line from the child"
        writer.stop()
    ids = [TEXT_ACCESS.fullmatch(line)["request_id"] for line in path.read_text().splitlines()]  # type: ignore[index]
    assert sorted(ids) == ["c", "p"]


def test_generated_request_ids_are_unique_and_valid(server: Any) -> None:
    ids = [new_request_id() for _ in range(100_000)] + infer_ids(server, 50)
    assert len(set(ids)) == len(ids)
    assert all(GENERATED_ID.fullmatch(i) for i in ids)


def test_each_process_draws_its_own_prefix() -> None:
    code = "from service.observability.logs import new_request_id; print(new_request_id())"
    spawned = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        .stdout.strip()
        .split("-")[0]
        for _ in range(3)
    }
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a forked worker must not reuse its parent's prefix
        try:  # whatever happens, the child never returns into pytest
            os.write(write, new_request_id().encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    forked = os.read(read, 100).decode().split("-")[0]
    os.close(read)
    os.close(write)
    assert len(spawned | {forked, new_request_id().split("-")[0]}) == 5


def test_workers_log_every_request_once_through_a_sigterm_drain(
    build: Any, tmp_path: Path, serve_process: Any
) -> None:
    """Two workers, JSON lines: each answered request has exactly one access line with its
    id, the ids are unique across the workers, and none is lost when SIGTERM stops them."""
    build.write_version(tmp_path, "linear", 1, build.linear_model(4, 5))
    flags = ["--log-level", "info", "--access-log", "--log-format", "json"]
    with serve_process(tmp_path, 2, *flags, "--drain-seconds", "0.2") as server:
        answers = [server.client.post("/v2/models/linear/infer", json=BODY) for _ in range(200)]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        log = tmp_path.parent / f"server-{server.url.rsplit(':', 1)[1]}.log"
    ids = [r.headers["x-request-id"] for r in answers if r.status_code == 200]
    assert len(ids) == 200 and len(set(ids)) == 200
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    access = [x for x in lines if x["logger"] == "service.access" and x["path"].endswith("/infer")]
    assert sorted(x["request_id"] for x in access) == sorted(ids)
    assert all(GENERATED_ID.fullmatch(i) for i in ids)


def test_start_up_objects_are_frozen_out_of_the_collector(server: Any) -> None:
    assert gc.get_freeze_count() > 10_000
