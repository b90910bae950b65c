"""What one client can hold: slow headers and bodies get 408 and a close, a body the server
holds back is not late, and past max_connections a new connection takes an idle one's place
or is refused at once. Real ``python -m service`` processes, raw sockets."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.polling import poll
from tests.servers import read_response

DIGITS = "/v2/models/digits_cnn/infer"


def closed_by_reason(url: str) -> dict[str, float]:
    """The close counters, asked until a connection gets through (it may find the server at
    its connection limit while the test's own closes are still on their way)."""
    answers: list[httpx.Response] = []

    def answered() -> bool:
        answers.append(httpx.get(url + "/metrics", timeout=30))
        return answers[-1].is_success

    poll(answered)
    text = answers[-1].text
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "foldserve_connections_closed_total"
    }


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def answer_and_close(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (monotonic)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic()


def test_slow_headers_silence_and_slow_bodies_get_408_and_a_close(
    model_store: Any, tmp_path: Path, serve_process: Any
) -> None:
    repo = model_store.copy_to(tmp_path / "models")
    flags = ("--header-timeout", "1", "--body-timeout", "1.5")
    with serve_process(repo, 2, *flags) as live:
        port = port_of(live.url)
        starts = {}
        socks = {}
        for kind, first in [
            ("slow header", b"POST " + DIGITS.encode() + b" HTTP/1.1\r\nHost: t\r\n"),
            ("silent", b""),
            (
                "slow body",
                b"POST /v2/models/digits_cnn/infer HTTP/1.1\r\nHost: t\r\n"
                b"Content-Length: 100000\r\n\r\n{",
            ),
        ]:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            starts[kind] = time.monotonic()
            sock.sendall(first)
            socks[kind] = sock
        limit = {"slow header": 1.0, "silent": 1.0, "slow body": 1.5}
        for kind, sock in socks.items():
            with sock:
                data, closed = answer_and_close(sock)
            assert data.startswith(b"HTTP/1.1 408 "), (kind, data)
            error = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
            assert f"within {limit[kind]:g} s" in error
            held = closed - starts[kind]
            assert limit[kind] - 0.05 < held < limit[kind] + 3.0, (kind, held)
        closed_reasons = closed_by_reason(live.url)
        assert closed_reasons["header_timeout"] == 2 and closed_reasons["body_timeout"] == 1
        # and the server still answers everyone else
        assert live.client.post(DIGITS, json=digits_body(1)).status_code == 200


def digits_body(samples: int) -> dict[str, Any]:
    tensor = {"name": "input", "shape": [samples, 1, 8, 8], "datatype": "FP32"}
    return {"inputs": [{**tensor, "data": [0.5] * (64 * samples)}]}


def test_a_request_that_waits_in_line_past_the_body_timeout_is_served(
    model_store: Any, tmp_path: Path, serve_process: Any
) -> None:
    """One request holds the model's only turn for 3 s; the next one, with a 400 kB body
    (past uvicorn's 64 KiB read-ahead), waits in line well past the 1 s body timeout, and
    is then served: the body clock stops once the body is in."""
    repo = model_store.copy_to(tmp_path / "models")
    flags = ("--body-timeout", "1", "--max-concurrency", "1", "--max-queue-delay-us", "3000000")
    with serve_process(repo, 1, *flags) as live:
        answers: dict[str, httpx.Response] = {}

        def post(key: str, samples: int) -> None:
            with httpx.Client(base_url=live.url, timeout=60) as client:
                answers[key] = client.post(DIGITS, json=digits_body(samples))

        holder = threading.Thread(target=post, args=("holder", 1))
        holder.start()
        poll(lambda: "foldserve_queue_depth" in held_queue(live.url))
        start = time.monotonic()
        big = threading.Thread(target=post, args=("big", 600))
        big.start()
        holder.join()
        big.join()
        waited = time.monotonic() - start
    assert answers["holder"].status_code == 200
    assert answers["big"].status_code == 200, answers["big"].text
    assert len(answers["big"].json()["outputs"][0]["data"]) == 600 * 10
    assert waited > 1.5  # it did wait in line past the body timeout


def held_queue(url: str) -> str:
    """The queue-depth sample lines of the metrics while a request is queued, else ''."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return "\n".join(
        line
        for line in text.splitlines()
        if line.startswith("foldserve_queue_depth{") and not line.endswith(" 0.0")
    )


def test_past_max_connections_an_idle_one_makes_room_or_the_new_one_is_refused(
    model_store: Any, tmp_path: Path, serve_process: Any
) -> None:
    repo = model_store.copy_to(tmp_path / "models")
    with serve_process(repo, 1, "--max-connections", "3") as live:
        port = port_of(live.url)
        idle = []
        for _ in range(3):  # three keep-alive connections, each idle after one answer
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(sock)[0] == 200
            idle.append(sock)
        slow = []
        for _ in range(3):  # each takes the place of the oldest idle one, then stays busy
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n")  # headers unfinished
            slow.append(sock)
        for sock in idle:  # closed by the server, oldest first, with no answer
            with sock:
                assert answer_and_close(sock)[0] == b""
        refused = socket.create_connection(("127.0.0.1", port), timeout=30)
        with refused:
            data, _ = answer_and_close(refused)
        assert data.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in data
        assert b"limit of 3 connections" in data
        for sock in slow:
            sock.close()
        counts = closed_by_reason(live.url)
    assert counts["idle_for_new"] == 3 and counts["refused_at_cap"] >= 1


def test_slow_bodies_hold_no_turn_at_the_models_entry(
    model_store: Any, tmp_path: Path, serve_process: Any
) -> None:
    """Requests still trickling their body in do not take the model's turns: with one turn
    and three such requests open, a normal request is answered at once."""
    repo = model_store.copy_to(tmp_path / "models")
    with serve_process(repo, 1, "--max-concurrency", "1") as live:
        port = port_of(live.url)
        slow = []
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(
                b"POST /v2/models/digits_cnn/infer HTTP/1.1\r\nHost: t\r\n"
                b"Content-Length: 100000\r\n\r\n{"
            )
            slow.append(sock)
        with httpx.Client(base_url=live.url, timeout=10) as client:
            answer = client.post(DIGITS, json=digits_body(1))
        for sock in slow:
            sock.close()
    assert answer.status_code == 200 and len(answer.json()["outputs"][0]["data"]) == 10
