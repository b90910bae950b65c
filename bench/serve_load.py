"""Load generator for a running FoldServe: requests/s and latency percentiles per concurrency.

    python bench/serve_load.py --url http://127.0.0.1:8000 --model digits_cnn \
        --concurrency 1,32 --duration 10 --mode json

Each of C clients (asyncio tasks, each on its own keep-alive HTTP/1.1
connection, spread over ``--processes`` processes) sends one V2 infer request,
waits for the answer, and sends the next, for ``--duration`` seconds after
``--warmup`` seconds. The clients write raw HTTP/1.1: an httpx client costs
more CPU per request than the server does and would be what gets measured.
Prints a table with its conditions. Client and server share the machine's CPUs
when both run on one host: the table says how many there are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from foldserve.datatypes import NUMPY_DTYPES


@dataclass(frozen=True)
class Payload:
    path: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: np.ndarray

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def build_payload(meta: dict[str, Any], batch: int, mode: str, seed: int = 0) -> Payload:
    """One V2 request for the model's single input: random data, JSON or binary tensors."""
    if len(meta["inputs"]) != 1:
        raise SystemExit("serve_load.py drives single-input models")
    spec = meta["inputs"][0]
    shape = [batch, *spec["shape"][1:]]
    dtype = NUMPY_DTYPES[spec["datatype"]]
    x = np.random.default_rng(seed).normal(size=shape).astype(dtype)
    path = f"/v2/models/{meta['name']}/infer"
    tensor: dict[str, Any] = {"name": spec["name"], "shape": shape, "datatype": spec["datatype"]}
    if mode == "json":
        tensor["data"] = x.ravel().tolist()
        body = json.dumps({"inputs": [tensor]}).encode()
        return Payload(path, body, {"Content-Type": "application/json"})
    raw = x.astype(x.dtype.newbyteorder("<")).tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return Payload(path, header + raw, headers)


async def _read_response(reader: asyncio.StreamReader) -> int:
    """One HTTP/1.1 response off a keep-alive connection; returns its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def _client_loop(
    host: str, port: int, request: bytes, start: float, stop: float, out: list[float]
) -> int:
    """One client on its own connection: send, wait for the answer, repeat until ``stop``."""
    reader, writer = await asyncio.open_connection(host, port)
    errors = 0
    try:
        while (t0 := time.perf_counter()) < stop:
            writer.write(request)
            await writer.drain()
            status = await _read_response(reader)
            t1 = time.perf_counter()
            if status != 200:
                errors += 1
            elif t0 >= start:  # after warm-up
                out.append(t1 - t0)
    finally:
        writer.close()
    return errors


def raw_request(url: str, payload: Payload) -> tuple[str, int, bytes]:
    """Host, port and the bytes of one keep-alive POST (a raw client: httpx's own
    overhead at 32 concurrent connections would be measured instead of the server's)."""
    parsed = httpx.URL(url)
    port = parsed.port or 80
    headers = {
        **payload.headers,
        "Host": f"{parsed.host}:{port}",
        "Content-Length": str(len(payload.body)),
    }
    head = f"POST {payload.path} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    return parsed.host, port, (head + "\r\n").encode() + payload.body


async def _run_clients(
    url: str, payload: Payload, clients: int, warmup: float, duration: float
) -> tuple[list[float], int]:
    host, port, request = raw_request(url, payload)
    latencies: list[float] = []
    start = time.perf_counter() + warmup
    stop = start + duration
    errors = await asyncio.gather(
        *(_client_loop(host, port, request, start, stop, latencies) for _ in range(clients))
    )
    return latencies, sum(errors)


def _process_main(args: tuple[str, Payload, int, float, float]) -> tuple[list[float], int]:
    return asyncio.run(_run_clients(*args))


def run_level(
    url: str, payload: Payload, concurrency: int, processes: int, warmup: float, duration: float
) -> LevelResult:
    """``concurrency`` clients over ``min(processes, concurrency)`` processes."""
    n = max(1, min(processes, concurrency))
    shares = [concurrency // n + (i < concurrency % n) for i in range(n)]
    jobs = [(url, payload, share, warmup, duration) for share in shares]
    if n == 1:
        results = [_process_main(jobs[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(n) as pool:
            results = pool.map(_process_main, jobs)
    latencies = np.array([x for lat, _ in results for x in lat]) * 1e3
    errors = sum(e for _, e in results)
    return LevelResult(concurrency, len(latencies), errors, duration, latencies)


def conditions(url: str, meta: dict[str, Any], args: argparse.Namespace) -> list[str]:
    server = httpx.get(f"{url}/v2", timeout=10).json()
    return [
        f"server      {url} ({server.get('name')} {server.get('version')})",
        f"model       {meta['name']} v{meta.get('version', '?')}, input "
        f"{meta['inputs'][0]['shape']} {meta['inputs'][0]['datatype']}, "
        f"provider {meta.get('provider', '?')}",
        f"request     batch {args.batch}, {args.mode} tensors, one request per client at a time",
        f"timing      {args.warmup:g} s warm-up, {args.duration:g} s measured per level, "
        f"{args.processes} client process(es)",
        f"client host {platform.node()}, {os.cpu_count()} CPUs (shared with the server if "
        f"it runs here), Python {platform.python_version()}, raw asyncio HTTP/1.1 clients",
    ]


def table(rows: list[LevelResult]) -> list[str]:
    lines = [
        f"{'clients':>7} {'requests':>9} {'errors':>6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
    ]
    for r in rows:
        p50, p99 = np.percentile(r.latencies_ms, [50, 99]) if r.requests else (np.nan, np.nan)
        lines.append(
            f"{r.concurrency:>7} {r.requests:>9} {r.errors:>6} {r.rps:>9.0f} "
            f"{p50:>8.2f} {p99:>8.2f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--batch", type=int, default=1, help="samples per request")
    parser.add_argument("--mode", choices=["json", "binary"], default="json")
    parser.add_argument("--processes", type=int, default=1, help="client processes")
    args = parser.parse_args()
    url = args.url.rstrip("/")
    meta = httpx.get(f"{url}/v2/models/{args.model}", timeout=10).raise_for_status().json()
    payload = build_payload(meta, args.batch, args.mode)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = [run_level(url, payload, c, args.processes, args.warmup, args.duration) for c in levels]
    print("\n".join(["FoldServe load test", *conditions(url, meta, args), "", *table(rows)]))


if __name__ == "__main__":
    main()
