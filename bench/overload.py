"""Goodput under overload: answers that succeed per second, from a few clients to thousands.

    python bench/overload.py          # FoldServe, the naive server, KServe and MLServer
    python bench/overload.py --servers fold --clients 256,2000 --duration 5
    python bench/overload.py --baseline ../before     # also FoldServe as another checkout has it
    python bench/overload.py --record docs/benchmarks.md

Every server starts with its defaults (FoldServe: one worker per CPU, access log
on) on the same model files, one server at a time. For each model and client count, wrk keeps that
many keep-alive connections with one request in flight each (a closed loop: a
refused client sends again at once, as a retrying client does). Goodput counts
2xx answers only. Beside wrk, a probe sends one request at a time on a new
connection (every ``PROBE_EVERY_S``) and times it: its 2xx latencies are what
an admitted request waits, its 503s what a refusal takes; it also asks
readiness each time. The servers' resident memory (all processes) is sampled
through the run, and FoldServe's access log gives the server-side time of each
503.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import throughput_load as load
import throughput_servers as servers
from markdown_section import publish
from processes import vm_rss_kib

START, END = "<!-- overload:start -->", "<!-- overload:end -->"
PROBE_EVERY_S = 0.05
# (model, tensor form): the small model in JSON, the larger one in binary tensors.
MODELS = {"digits_cnn": "json", "resnet_bench": "binary"}
ACCESS_503 = re.compile(r'"POST [^"]*/infer" 503 ([0-9.]+)ms')


@dataclass
class Probe:
    """One request at a time during a cell: latencies by outcome, readiness answers."""

    url: str
    path: str
    body: bytes
    headers: dict[str, str]
    ok_ms: list[float] = field(default_factory=list)
    refused_ms: list[float] = field(default_factory=list)
    failed: int = 0  # no answer, or an answer other than 2xx/503
    not_ready: int = 0
    rss_mib: list[float] = field(default_factory=list)

    def run(self, stop: threading.Event, pids: list[int]) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        while not stop.wait(PROBE_EVERY_S):
            self.rss_mib.append(sum(vm_rss_kib(p) for p in pids) / 1024)
            start = time.perf_counter()
            try:
                status = self._post(host, int(port))
            except (OSError, http.client.HTTPException):
                self.failed += 1
                continue
            ms = (time.perf_counter() - start) * 1e3
            if 200 <= status < 300:
                self.ok_ms.append(ms)
            elif status == 503:
                self.refused_ms.append(ms)
            else:
                self.failed += 1
            with contextlib.suppress(OSError, http.client.HTTPException):
                # 404: a server with no readiness route (the naive one)
                if self._get(host, int(port), "/v2/health/ready") not in (200, 404):
                    self.not_ready += 1

    def _post(self, host: str, port: int) -> int:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        try:
            conn.request("POST", self.path, self.body, self.headers)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def _get(self, host: str, port: int, path: str) -> int:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()


def server_pids(server: servers.RunningServer) -> list[int]:
    pid = server.process.pid
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [pid, *map(int, children)]
    return [pid]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Cell:
    server: str
    model: str
    clients: int
    goodput: float
    refused: int
    timeouts: int
    errors: int  # socket errors
    probe: Probe
    server_503_ms: list[float]

    def row(self, peak: float) -> str:
        p = self.probe
        refusal = (
            f"{pct(self.server_503_ms, 0.5):.2f} / {pct(self.server_503_ms, 0.99):.2f}"
            if self.server_503_ms
            else "-"
        )
        return (
            f"| {self.server} | {self.model} | {self.clients:,} | {self.goodput:,.0f} | "
            f"{self.goodput / peak:.2f} | {self.refused:,} | {self.timeouts + self.errors:,} | "
            f"{pct(p.ok_ms, 0.5):.0f} / {pct(p.ok_ms, 0.99):.0f} ({len(p.ok_ms)}) | "
            f"{len(p.refused_ms)} | {refusal} | {p.not_ready} | {max(p.rss_mib, default=0):.0f} |"
        )


def measure(
    server: servers.RunningServer,
    model: str,
    payload: load.Payload,
    body: Path,
    clients: int,
    seconds: float,
) -> Cell:
    path = f"/v2/models/{model}/infer"
    probe = Probe(server.url, path, payload.body, payload.headers)
    stop = threading.Event()
    thread = threading.Thread(target=probe.run, args=(stop, server_pids(server)), daemon=True)
    log_offset = server.log_path.stat().st_size
    thread.start()
    try:
        raw = load.run_wrk(server.url + path, body, payload.headers, clients, seconds)
    finally:
        stop.set()
        thread.join()
    with server.log_path.open("rb") as log:
        log.seek(log_offset)
        tail = log.read().decode(errors="replace")
    refused_ms = [float(m) for m in ACCESS_503.findall(tail)]
    errors = sum(int(raw[k]) for k in ("connect_errors", "read_errors", "write_errors"))
    good = int(raw["requests"]) - int(raw["status_errors"])
    return Cell(
        server.spec.key,
        model,
        clients,
        good / (raw["duration_us"] / 1e6),
        int(raw["status_errors"]),
        int(raw["timeouts"]),
        errors,
        probe,
        refused_ms,
    )


def measure_server(
    server: servers.RunningServer, args: argparse.Namespace, clients: list[int], workdir: Path
) -> list[Cell]:
    """Every model and client count on one server (after a warm-up per model)."""
    cells = []
    for model in args.models.split(","):
        kind = MODELS[model]
        if kind == "binary" and server.spec.key in ("naive", "mlserver"):
            continue  # their V2 routes take JSON tensors only
        name, sample = load.model_input(args.repository, model)
        payload = load.make_payload(name, sample, 1, kind)
        body = payload.write(workdir, model)
        path = f"/v2/models/{model}/infer"
        servers.wait_ready(server, path, payload.body, payload.headers)
        load.run_wrk(server.url + path, body, payload.headers, 64, args.warmup)
        for c in clients:
            cell = measure(server, model, payload, body, c, args.duration)
            cells.append(cell)
            print(cell.row(cell.goodput), flush=True)
    return cells


def conditions(args: argparse.Namespace) -> list[str]:
    cpu = load.cpu_model()
    one, five, _ = os.getloadavg()
    return [
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {cpu}, "
        f"{len(os.sched_getaffinity(0))} usable CPUs; load average before: {one:.2f} {five:.2f}",
        f"- each cell: wrk, 1 thread, closed loop, keep-alive, {args.duration:g} s, after a "
        f"{args.warmup:g} s warm-up per server and model; one server running at a time, "
        f"with its defaults ({args.workers} worker processes where they take a count)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--servers", default="fold,naive,kserve,mlserver")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--clients", default="64,256,1000,2000,4000")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--baseline", type=Path, help="another checkout, served as fold-base")
    parser.add_argument("--record", type=Path, help="write the table into this markdown file")
    args = parser.parse_args()
    wanted = args.servers.split(",")
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        workdir = Path(tmp)
        specs = servers.server_specs(
            args.repository.resolve(),
            args.workers,
            args.workers,
            "kserve" in wanted,
            open(os.devnull, "w"),  # noqa: SIM115 (peer venv creation output)
            args.baseline,
            with_mlserver="mlserver" in wanted,
        )
        keep = {"fold-base"} | set(wanted)
        specs = [s for s in specs if s.key in keep]
        cells: list[Cell] = []
        # One server at a time: KServe's and MLServer's idle processes take CPU of their own
        # (~15% of a core each, seen with top), which would weigh on every other row.
        for spec in specs:
            server = servers.start(spec, workdir)
            try:
                cells += measure_server(server, args, clients, workdir)
            finally:
                servers.stop(server)
        lines = table(cells, args)
        record = args.record or Path(os.devnull)
        publish(lines, record, START, END, write=args.record is not None)


def table(cells: list[Cell], args: argparse.Namespace) -> list[str]:
    peaks: dict[tuple[str, str], float] = {}
    for cell in cells:
        key = (cell.server, cell.model)
        peaks[key] = max(peaks.get(key, 0.0), cell.goodput)
    lines = [
        *conditions(args),
        "",
        "| server | model | clients | goodput (2xx/s) | x its peak | 503s | timeouts + "
        "socket errors | probe 2xx p50 / p99 ms (n) | probe 503s | server 503 p50 / p99 ms | "
        "not ready | RSS MiB (max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(cells, key=lambda c: (c.model, c.server, c.clients))
    lines += [c.row(peaks[(c.server, c.model)]) for c in order]
    ratios = []
    for (server, model), _ in peaks.items():
        by_clients = {c.clients: c.goodput for c in cells if (c.server, c.model) == (server, model)}
        if 256 in by_clients and 2000 in by_clients:
            ratios.append(
                f"- {server}, {model}: goodput at 2,000 clients / at 256 = "
                f"{by_clients[2000] / by_clients[256]:.2f}"
            )
    return [*lines, "", *ratios]


if __name__ == "__main__":
    main()
