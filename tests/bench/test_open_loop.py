"""bench/open_loop.py's pure parts and its HTTP/1.1 client: the Poisson schedule, a cell's
summary, the dropped-requests counter read from /metrics, and answers read back from a real
socket on 127.0.0.1 (answers split across reads, refusals, a closed connection).

The script imports its sibling bench modules by their bare names, as a script does, so
bench/ goes on the path for this module's import.
"""

from __future__ import annotations

import asyncio
import importlib
import math
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pytest

from tests.bench.scripts import bench_module


@pytest.fixture(scope="module")
def ol() -> Iterator[ModuleType]:
    with bench_module("open_loop") as module:
        yield module


@pytest.fixture(scope="module")
def report(ol: ModuleType) -> ModuleType:
    """bench/open_loop_report.py (importable while ``ol`` holds bench/ on the path)."""
    return importlib.import_module("open_loop_report")


@pytest.mark.parametrize(("rate", "seconds"), [(50.0, 20.0), (400.0, 10.0), (5000.0, 4.0)])
def test_poisson_schedule_has_the_rate_and_exponential_gaps(
    ol: ModuleType, rate: float, seconds: float
) -> None:
    times = ol.poisson_schedule(rate, seconds, np.random.default_rng(1))
    expected = rate * seconds
    assert abs(len(times) - expected) < 4 * math.sqrt(expected)  # Poisson: sd = sqrt(mean)
    assert times[0] >= 0 and times[-1] < seconds
    gaps = np.diff(times)
    assert (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)  # exponential: CV 1


def test_poisson_schedule_of_nothing(ol: ModuleType) -> None:
    assert len(ol.poisson_schedule(0.0, 5.0, np.random.default_rng(0))) == 0


def test_summary_counts_goodput_within_the_target_and_shares_of_the_scheduled(
    report: ModuleType,
) -> None:
    a = report.SenderTally(scheduled=10, sent=9, sent_all=12, late=1, client_dropped=1)
    a.ok_s = [0.001, 0.002, 0.003, 0.004, 0.030]
    a.refused, a.expired, a.errors, a.first_error = 2, 1, 1, "HTTP 500"
    a.cpu_s, a.wall_s = 0.012, 4.0
    b = report.SenderTally(scheduled=10, sent=10, sent_all=8)
    b.ok_s = [0.005, 0.006, 0.007, 0.008, 0.009, 0.050]
    b.refused, b.expired = 3, 1
    b.cpu_s, b.wall_s = 0.008, 5.0

    cell = report.summarize(400.0, 2.0, [a, b], 0.010, {"queue_full": 5.0})

    assert cell.offered == 400.0
    assert cell.sent_per_s == 19 / 2
    assert cell.ok_per_s == 11 / 2
    assert cell.goodput_per_s == 9 / 2  # 30 ms and 50 ms missed the 10 ms target
    assert cell.p50_ms == pytest.approx(6.0)  # 6th of 11 sorted
    assert cell.p99_ms == pytest.approx(50.0)
    assert (cell.refused, cell.expired, cell.errors) == (5 / 20, 2 / 20, 1 / 20)
    assert cell.first_error == "HTTP 500"
    assert (cell.client_dropped, cell.late_sends) == (1, 1)
    assert cell.sender_cores == pytest.approx(0.020 / 5.0)  # both senders over the longest
    assert cell.sender_cpu_us == pytest.approx(0.020 / 20 * 1e6)  # warm-up sends included
    assert cell.server_dropped == {"queue_full": 5.0}


def test_summary_without_a_target_counts_every_2xx(report: ModuleType) -> None:
    tally = report.SenderTally(scheduled=3, sent=3, sent_all=3, ok_s=[0.5, 1.0, 2.0])
    cell = report.summarize(3.0, 1.0, [tally], None, None)
    assert cell.goodput_per_s == cell.ok_per_s == 3.0
    assert cell.server_dropped is None


METRICS = """\
# HELP foldserve_requests_dropped_total Requests that left the queue without running
# TYPE foldserve_requests_dropped_total counter
foldserve_requests_dropped_total{model="a",reason="queue_full",version="1"} 3.0
foldserve_requests_dropped_total{model="a",reason="queue_full",version="2"} 4.0
foldserve_requests_dropped_total{model="b",reason="queue_full",version="2"} 4.0
foldserve_requests_dropped_total{model="a",reason="expired",version="1"} 1.0
foldserve_requests_dropped_created{model="a",reason="expired",version="1"} 1.7e9
foldserve_requests_total{model="a",protocol="rest",code="200"} 99.0
"""


def test_dropped_requests_are_summed_by_reason_for_the_model(report: ModuleType) -> None:
    assert report.dropped_by_reason(METRICS, "a") == {"queue_full": 7.0, "expired": 1.0}
    assert report.dropped_by_reason(METRICS, "b") == {"queue_full": 4.0}
    assert report.dropped_by_reason(METRICS, "c") == {}
    assert report.dropped_by_reason("foldserve_requests_total 1.0\n", "a") is None


def test_delta_keeps_the_reasons_that_rose(report: ModuleType) -> None:
    before = {"queue_full": 7.0, "expired": 1.0}
    after = {"queue_full": 7.0, "expired": 4.0, "cancelled": 2.0}
    assert report.delta(before, after) == {"cancelled": 2.0, "expired": 3.0}
    assert report.delta(None, after) == after
    assert report.delta(before, None) is None


@pytest.mark.parametrize("kind", ["json", "binary"])
def test_rest_body_tells_the_server_its_deadline(ol: ModuleType, kind: str) -> None:
    """The server's own codec reads the target back as parameters.timeout, tensors intact."""
    from service.rest.codec import decode_infer_request

    payload = ol.load.make_payload("x", [1, 4, 4], 1, kind)
    body, headers = ol.with_timeout(payload, 20_000)
    decoded = decode_infer_request(body, headers.get("Inference-Header-Content-Length"))
    assert decoded.timeout_us == 20_000
    np.testing.assert_array_equal(decoded.inputs[0].array, payload.inputs)
    assert ol.with_timeout(payload, None) == (payload.body, payload.headers)


ANSWERS = {
    # path: the bytes the server writes, in pieces
    "/ok": [b"HTTP/1.1 200 OK\r\nconte", b"nt-length: 5\r\n\r\nhel", b"lo"],
    "/busy": [b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"],
    "/late": [b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 2\r\n\r\n{}"],
    "/bad": [b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"],
    "/gone": [],  # the server closes without answering
}


async def exchanges(ol: ModuleType, path: str, times: int) -> tuple[list[object], int]:
    """The outcomes of ``times`` requests to ``path`` through one RestClient, one after the
    other, and how many connections the server accepted meanwhile."""
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        while not reader.at_eof():
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r")[0]))
            for piece in ANSWERS[path]:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)  # the client reads the answer in pieces
            if not ANSWERS[path] or b"Connection: close" in ANSWERS[path][-1]:
                writer.close()
                return

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clients = importlib.import_module("open_loop_clients")  # beside open_loop, on the path
    request = clients.Request("rest", f"http://127.0.0.1:{port}{path}", b"{}", {}, None)
    client = clients.RestClient(request)
    outcomes = [(await client.send(None))[0] for _ in range(times)]
    await client.close()
    server.close()
    return outcomes, accepted


@pytest.mark.parametrize(
    ("path", "outcome", "connections"),
    [("/ok", "OK", 1), ("/busy", "REFUSED", 1), ("/late", "EXPIRED", 1), ("/bad", "ERROR", 3)],
)
def test_rest_client_reads_each_answer_and_keeps_its_connection_alive(
    ol: ModuleType, path: str, outcome: str, connections: int
) -> None:
    """Three requests in turn: one connection while the server keeps it alive, a new one
    after each ``Connection: close``."""
    outcomes, accepted = asyncio.run(exchanges(ol, path, 3))
    assert outcomes == [ol.Outcome[outcome]] * 3
    assert accepted == connections


def test_rest_client_counts_a_closed_connection_as_an_error(ol: ModuleType) -> None:
    outcomes, _ = asyncio.run(exchanges(ol, "/gone", 2))
    assert outcomes == [ol.Outcome.ERROR] * 2
