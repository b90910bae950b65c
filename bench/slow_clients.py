"""Slow and idle clients: are they cut off at their limits, and do normal clients notice?

    python bench/slow_clients.py                        # 1,500 slow-header + 1,500 slow-body
    python bench/slow_clients.py --slow 300 --header-timeout 3 --body-timeout 5 --duration 10
    python bench/slow_clients.py --baseline ../before   # FoldServe as another checkout has it
    python bench/slow_clients.py --record docs/benchmarks.md

FoldServe starts with its defaults (one worker per CPU; the time limits given
here, else its own). 64 normal clients (wrk, closed loop, digits JSON) run for
``--duration`` s alone, then again while ``--slow`` connections send a request
line and one header line every ``--trickle`` s without ever finishing, and as
many send complete headers announcing a 100 kB body and then one byte every
``--trickle`` s. Reported: how many slow connections the server closed, after
how long (against its limit), how many got a 408; the normal clients' goodput
during the attack against before it; every worker's open descriptors over
time (/proc/PID/fd).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import throughput_load as load
import throughput_servers as servers
from markdown_section import publish
from processes import server_worker_pids

START, END = "<!-- slow-clients:start -->", "<!-- slow-clients:end -->"
FIRST = {
    "header": b"POST /v2/models/digits_cnn/infer HTTP/1.1\r\nHost: bench\r\n",
    "body": b"POST /v2/models/digits_cnn/infer HTTP/1.1\r\nHost: bench\r\n"
    b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{",
}
TRICKLE = {"header": b"X-Slow: 1\r\n", "body": b" "}


@dataclass(frozen=True)
class Closed:
    kind: str
    seconds: float | None  # None: still open at the end
    got_408: bool


async def slow_connection(kind: str, port: int, trickle: float, until: float) -> Closed:
    start = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return Closed(kind, 0.0, False)
    writer.write(FIRST[kind])
    got = b""
    try:
        while time.monotonic() < until:
            try:
                data = await asyncio.wait_for(reader.read(65536), trickle)
            except TimeoutError:
                writer.write(TRICKLE[kind])
                continue
            if not data:
                return Closed(kind, time.monotonic() - start, got.startswith(b"HTTP/1.1 408"))
            got += data
    except OSError:
        return Closed(kind, time.monotonic() - start, got.startswith(b"HTTP/1.1 408"))
    finally:
        writer.close()
    return Closed(kind, None, False)


async def attack(port: int, slow: int, trickle: float, seconds: float) -> list[Closed]:
    until = time.monotonic() + seconds
    tasks = []
    for i in range(slow):  # opened in waves, so the listen backlog keeps up
        for kind in ("header", "body"):
            tasks.append(asyncio.create_task(slow_connection(kind, port, trickle, until)))
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    return list(await asyncio.gather(*tasks))


def descriptors(pids: list[int]) -> list[int]:
    counts = []
    for pid in pids:
        with contextlib.suppress(OSError):
            counts.append(len(os.listdir(f"/proc/{pid}/fd")))
    return counts


def goodput(raw: dict[str, int]) -> float:
    return (raw["requests"] - raw["status_errors"]) / (raw["duration_us"] / 1e6)


def run(server: servers.RunningServer, args: argparse.Namespace, workdir: Path) -> list[str]:
    name, sample = load.model_input(args.repository, "digits_cnn")
    payload = load.make_payload(name, sample, 1, "json")
    body = payload.write(workdir, "digits")
    url = server.url + "/v2/models/digits_cnn/infer"
    servers.wait_ready(server, "/v2/models/digits_cnn/infer", payload.body, payload.headers)
    load.run_wrk(url, body, payload.headers, 64, 2)  # warm-up
    before = goodput(load.run_wrk(url, body, payload.headers, 64, args.duration))
    pids = server_worker_pids(server.process.pid)
    fds: list[list[int]] = []
    stop = threading.Event()

    def count_descriptors() -> None:
        while not stop.wait(0.5):
            fds.append(descriptors(pids))

    sampler = threading.Thread(target=count_descriptors, daemon=True)
    sampler.start()
    attack_s = max(args.header_timeout, args.body_timeout) + 5
    results: list[Closed] = []
    attacker = threading.Thread(
        target=lambda: results.extend(
            asyncio.run(attack(server.port, args.slow, args.trickle, attack_s))
        )
    )
    attacker.start()
    during = goodput(load.run_wrk(url, body, payload.headers, 64, args.duration))
    attacker.join()
    stop.set()
    sampler.join()
    lines = [
        f"- {server.spec.label}: {args.slow:,} slow-header and {args.slow:,} slow-body "
        f"connections (one more byte every {args.trickle:g} s), header limit "
        f"{args.header_timeout:g} s, body limit {args.body_timeout:g} s; 64 wrk clients "
        f"for {args.duration:g} s before and during"
    ]
    for kind, limit in (("header", args.header_timeout), ("body", args.body_timeout)):
        mine = [r for r in results if r.kind == kind]
        closed = [r.seconds for r in mine if r.seconds is not None]
        late = sum(1 for s in closed if s > limit + 1.0)
        times = (
            f"after {min(closed):.1f} / {statistics.median(closed):.1f} / {max(closed):.1f} s "
            f"(min / median / max)"
            if closed
            else "none closed"
        )
        lines.append(
            f"  - slow {kind}: {len(closed):,} of {len(mine):,} closed by the server within "
            f"{attack_s:g} s, {times}; {late} later than the limit + 1 s; "
            f"{sum(r.got_408 for r in mine):,} got a 408"
        )
    peak = [max(s) for s in zip(*fds, strict=False)] if fds else []
    lines.append(
        f"  - normal clients' goodput: {before:,.0f} req/s before, {during:,.0f} during "
        f"({during / before:.2f}x)"
    )
    lines.append(f"  - open descriptors per worker, most seen: {peak} (samples every 0.5 s)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--slow", type=int, default=1500, help="connections of each kind")
    parser.add_argument("--trickle", type=float, default=5.0)
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--body-timeout", type=float, default=30.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--baseline", type=Path, help="another checkout, measured after")
    parser.add_argument("--record", type=Path, help="write the results into this markdown file")
    args = parser.parse_args()
    args.repository = args.repository.resolve()
    command = [sys.executable, "-m", "service", "--repository", str(args.repository)]
    command += ["--providers", "cpu"]
    limits = ["--header-timeout", str(args.header_timeout)]
    limits += ["--body-timeout", str(args.body_timeout)]
    specs = [servers.ServerSpec("fold", "FoldServe", command + limits)]
    if args.baseline is not None:  # it has no such flags
        base = args.baseline.resolve()
        specs.append(servers.ServerSpec("fold-base", "FoldServe baseline", command, root=base))
    one, five, _ = os.getloadavg()
    lines = [
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {len(os.sched_getaffinity(0))} "
        f"usable CPUs; load average before: {one:.2f} {five:.2f}; servers with their "
        "defaults otherwise (one worker per CPU)"
    ]
    with tempfile.TemporaryDirectory(prefix="slow-clients-") as tmp:
        for spec in specs:
            server = servers.start(spec, Path(tmp))
            try:
                lines += run(server, args, Path(tmp))
            finally:
                servers.stop(server)
    record = args.record or Path(os.devnull)
    publish(lines, record, START, END, write=args.record is not None)


if __name__ == "__main__":
    main()
