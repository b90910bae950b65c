"""Under overload: refusals before the body.

Events are ordered by polling the server's own state (metrics, listeners,
answers), never by sleeping.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from test_service_batching import HOLD_US, scrape, value

ROOT = Path(__file__).resolve().parents[2]
DIGITS_BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
).encode()


def poll(condition: Callable[[], bool], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection without an answer"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def test_a_refusal_comes_before_the_body_is_read(fresh_server: Any) -> None:
    """A full model answers 503 to a request whose body has not even arrived: refusing
    costs no body read and no decoding."""
    labels = {"model": "digits_cnn", "version": "1"}
    with (
        fresh_server(max_queue_size=1, max_queue_delay_us=HOLD_US) as live,
        live.client() as client,
    ):
        held: list[httpx.Response] = []

        def post() -> None:
            held.append(client.post("/v2/models/digits_cnn/infer", content=DIGITS_BODY))

        thread = threading.Thread(target=post)
        thread.start()
        poll(lambda: value(scrape(client), "foldserve_queue_depth", **labels) == 1)
        with socket.create_connection(("127.0.0.1", live.port), timeout=20) as sock:
            sock.sendall(
                b"POST /v2/models/digits_cnn/infer HTTP/1.1\r\nHost: test\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                b'{"inputs": ['  # and nothing more of the 100,000 bytes announced
            )
            status, headers, body = read_response(sock)
        assert status == 503 and headers["retry-after"] == "1"
        assert "max_queue_size 1" in json.loads(body)["error"]
        thread.join()
        assert held[0].status_code == 200
        samples = scrape(client)
    assert value(samples, "foldserve_requests_dropped_total", reason="queue_full", **labels) == 1
