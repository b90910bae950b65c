"""Open-loop load: requests sent on a Poisson schedule whatever the server answers.

    python bench/open_loop.py --start fold --model digits_cnn --rates 100,200,400
    python bench/open_loop.py --start fold --protocol grpc --capacity-multiples 0.5,1,2,4 \\
        --target-ms 20 --env FOLDSERVE_LATENCY_TARGET_MS=20
    python bench/open_loop.py --url http://127.0.0.1:8000 --rates 300 --json cells.json --markdown

Closed-loop clients (wrk, h2load) wait for each answer before the next, so they slow down
with the server and its queueing never shows. Here each sender process sends on its own
Poisson schedule (the senders' shares add up to the offered rate) and times every request
from its *scheduled* send, so a backlog anywhere, the client's included, counts as
latency; goodput counts the 2xx answers that came within ``--target-ms`` of it. The
senders are cheap (uvloop, one prepared request, a bare HTTP/1.1 client or one gRPC
channel) but on a 2-CPU machine their CPU is the server's loss, so they report it; "late
sends" (over ``LATE_S`` behind schedule) say the generator, not the server, fell behind.
Around each cell the server's ``foldserve_requests_dropped_total`` is read (warm-up
included): the requests it dropped without computing them, by reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc_load
import numpy as np
import throughput_load as load
import throughput_servers as servers
from open_loop_clients import Outcome, Request, make_client
from open_loop_report import (
    HEADER,
    Cell,
    SenderTally,
    delta,
    row,
    scrape_dropped,
    summarize,
    text_line,
)
from processes import free_port

LATE_S = 0.010  # a send this far behind schedule: the generator is saturated
MIN_SLEEP_S = 1e-3  # the event loop's timer resolution
SENDER_NICE = -5  # the senders' priority, above the server's (needs root or CAP_SYS_NICE)
MAX_IN_FLIGHT = 20_000  # per sender: a send beyond it is dropped on the client, and counted
FD_RESERVE = 256  # descriptors left for anything but REST connections (one per request)
CAPACITY_IN_FLIGHT = 64  # the closed loop that measures capacity when --capacity is absent
CAPACITY_SECONDS = 4.0
T = TypeVar("T")


@dataclass(frozen=True)
class SenderPlan:
    """One sender's part of a cell: ``rate`` req/s for ``warmup`` s (not counted), then
    ``duration`` s counted, then up to ``drain`` s for the counted answers still out."""

    rate: float
    warmup: float
    duration: float
    drain: float
    seed: int
    max_in_flight: int


def poisson_schedule(rate: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Send times in s from the start, ascending, of a Poisson process of ``rate``/s over
    ``[0, seconds)``: independent exponential gaps of mean ``1/rate``."""
    if rate <= 0 or seconds <= 0:
        return np.empty(0)
    chunk = int(rate * seconds + 6 * math.sqrt(rate * seconds)) + 16
    times = np.cumsum(rng.exponential(1.0 / rate, chunk))
    while times[-1] < seconds:
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1 / rate, chunk))])
    return times[times < seconds]


async def send_schedule(request: Request, plan: SenderPlan) -> SenderTally:
    """Fires each request at its scheduled time (all those due at each wake-up), never
    waiting for answers; then waits up to ``plan.drain`` s for the counted ones still out."""
    rng = np.random.default_rng(plan.seed)
    times: list[float] = poisson_schedule(plan.rate, plan.warmup + plan.duration, rng).tolist()
    client, tally = make_client(request), SenderTally()
    in_flight: set[asyncio.Task[None]] = set()
    counted: set[asyncio.Task[None]] = set()

    async def one(at: float, budget_s: float | None, count: bool) -> None:
        try:
            outcome, message = await client.send(budget_s)
        except Exception as err:  # counted and shown, not lost in a task nobody awaits
            outcome, message = Outcome.ERROR, f"{type(err).__name__}: {err}"
        if count:
            tally.record(outcome, time.perf_counter() - (t0 + at), message)

    def fire(at: float, late_s: float) -> None:
        count = at >= plan.warmup
        tally.scheduled += count
        tally.late += count and late_s > LATE_S
        if len(in_flight) >= plan.max_in_flight:
            tally.client_dropped += count
            return
        tally.sent += count
        tally.sent_all += 1
        # the caller's deadline runs from when it meant to send
        budget = None if request.target_s is None else max(1e-3, request.target_s - late_s)
        task = asyncio.get_running_loop().create_task(one(at, budget, count))
        for tasks in (in_flight, counted) if count else (in_flight,):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    t0, cpu0, i = time.perf_counter(), time.process_time(), 0
    while i < len(times):
        now = time.perf_counter() - t0
        while i < len(times) and times[i] <= now:
            fire(times[i], now - times[i])
            i += 1
        if i < len(times):
            # Timers tick in ms and a shorter sleep returns at once: a spin that cost ~2x
            # the CPU. So sends are ~0.5 ms late on average, counted as latency.
            await asyncio.sleep(max(MIN_SLEEP_S, times[i] - (time.perf_counter() - t0)))
    if counted:
        await asyncio.wait(counted, timeout=plan.drain)
    tally.expired += len(counted)  # no answer by the end of the drain
    for task in in_flight:
        task.cancel()
    await asyncio.gather(*in_flight, return_exceptions=True)
    tally.cpu_s, tally.wall_s = time.process_time() - cpu0, time.perf_counter() - t0
    await client.close()
    return tally


def run_loop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``main()`` on uvloop where installed (less CPU per request), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def sender_main(request: Request, plan: SenderPlan, start: Barrier, results: Any) -> None:
    """One sender process: imported and ready, it waits for the others, then sends. It
    runs ahead of the server for the CPU (where allowed): a server that takes every core
    would otherwise make the sends late, and the latencies the generator's."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(PermissionError):
        os.nice(SENDER_NICE)
    start.wait()
    results.put(run_loop(lambda: send_schedule(request, plan)))


def run_senders(request: Request, rate: float, args: argparse.Namespace) -> list[SenderTally]:
    """``args.senders`` processes (spawned: no gRPC state inherited), each with an equal
    share of ``rate``, started together."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(args.senders + 1), ctx.Queue()
    share = rate / args.senders
    plans = [
        SenderPlan(share, args.warmup, args.duration, args.drain, seed, args.bound)
        for seed in range(args.senders)
    ]
    procs = [ctx.Process(target=sender_main, args=(request, p, start, results)) for p in plans]
    for proc in procs:
        proc.start()
    start.wait(timeout=120)
    tallies = [results.get(timeout=args.warmup + args.duration + args.drain + 120) for _ in procs]
    for proc in procs:
        proc.join()
    return tallies


async def closed_loop_rate(request: Request, in_flight: int, seconds: float) -> float:
    """2xx answers/s with ``in_flight`` requests always out (each sent again on its answer),
    over ``seconds`` after a 1 s warm-up: the capacity a closed loop sees."""
    client, outcomes = make_client(request), Counter[Outcome]()

    async def worker(until: float) -> None:
        while time.perf_counter() < until:
            outcome, _ = await client.send(None)
            outcomes[outcome] += 1

    await asyncio.gather(*(worker(time.perf_counter() + 1.0) for _ in range(in_flight)))
    outcomes.clear()
    start = time.perf_counter()
    await asyncio.gather(*(worker(start + seconds) for _ in range(in_flight)))
    rate = outcomes[Outcome.OK] / (time.perf_counter() - start)
    await client.close()
    if outcomes.total() > outcomes[Outcome.OK]:
        print(f"capacity: not every answer was a 2xx: {dict(outcomes)}", file=sys.stderr)
    return rate


def prepare_request(args: argparse.Namespace, url: str, grpc_target: str | None) -> Request:
    """Random FP32 data of batch 1 in the input shape of the model's metadata.json (every
    model of the repository takes FP32; the peers serve no metadata route of their own)."""
    name, sample = load.model_input(args.repository, args.model)
    if args.protocol == "grpc":
        if grpc_target is None:
            raise SystemExit("--protocol grpc needs --grpc HOST:PORT (or --start)")
        message = grpc_load.make_payload(args.model, name, sample, 1).message
        sent = None if args.target_ms is None or args.no_deadline else args.target_ms / 1e3
        return Request("grpc", grpc_target, message, {}, sent)
    payload = load.make_payload(name, sample, 1, args.encoding)
    own = args.target_ms is None or args.no_deadline
    timeout_us = None if own else round(args.target_ms * 1e3)
    body, headers = with_timeout(payload, timeout_us)
    return Request("rest", f"{url}/v2/models/{args.model}/infer", body, headers, None)


def with_timeout(payload: load.Payload, timeout_us: int | None) -> tuple[bytes, dict[str, str]]:
    """The payload's body and headers, with Triton's ``parameters.timeout`` (us) in its JSON
    when given: REST's grpc-timeout, the caller's deadline told to the server."""
    if timeout_us is None:
        return payload.body, payload.headers
    length = payload.headers.get("Inference-Header-Content-Length")
    split = len(payload.body) if length is None else int(length)  # JSON, then binary tensors
    header = json.loads(payload.body[:split])
    header.setdefault("parameters", {})["timeout"] = timeout_us
    head = json.dumps(header).encode()
    headers = dict(payload.headers)
    if length is not None:
        headers["Inference-Header-Content-Length"] = str(len(head))
    return head + payload.body[split:], headers


def start_server(
    args: argparse.Namespace, workdir: Path
) -> tuple[servers.RunningServer, str | None]:
    """A server as bench/throughput_servers.py starts it (``--env`` on top; FoldServe with
    its gRPC port open), once every worker answers a request of the model over REST."""
    peer = args.start not in ("fold", "fold-off")
    specs = servers.server_specs(
        args.repository.resolve(), args.workers, args.workers, args.start == "kserve",
        sys.stderr, with_mlserver=args.start == "mlserver",
    )  # fmt: skip
    spec = next(s for s in specs if s.key == args.start)
    port = None if peer else free_port()
    command = spec.command if port is None else [*spec.command, "--grpc-port", str(port)]
    running = servers.start(replace(spec, command=command, env={**spec.env, **args.env}), workdir)
    name, sample = load.model_input(args.repository, args.model)
    payload = load.make_payload(name, sample, 1, "json")
    servers.wait_ready(running, f"/v2/models/{args.model}/infer", payload.body, payload.headers)
    return running, None if port is None else f"127.0.0.1:{port}"


def wait_grpc(request: Request, limit: float = 30.0) -> None:
    """Until the prepared call succeeds: gRPC listens beside REST, not necessarily with it."""
    deadline = time.monotonic() + limit
    with grpc_load.channel(request.address) as channel:
        infer = channel.unary_unary(grpc_load.METHOD)
        while True:
            try:
                infer(request.body, timeout=5.0)
                return
            except grpc.RpcError as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gRPC at {request.address} not ready: {err}") from None
                time.sleep(0.2)


def conditions(args: argparse.Namespace, request: Request, capacity: float | None) -> list[str]:
    env = " ".join(f"{k}={v}" for k, v in args.env.items()) or "none"
    encoding = f" {args.encoding}" if request.protocol == "rest" else ""
    target = "none" if args.target_ms is None else f"{args.target_ms:g} ms"
    if args.target_ms is not None and args.no_deadline:
        target += " (counted, not sent)"
    lines = [
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {load.cpu_model()}, "
        f"{len(os.sched_getaffinity(0))} usable CPUs; load average {os.getloadavg()[0]:.2f}",
        f"- {args.model}, batch 1, {request.protocol}{encoding}; server: {args.start or args.url}"
        f" (--env: {env}); latency target: {target}",
        f"- open loop: {args.senders} sender process(es), Poisson arrivals, {args.warmup:g} s "
        f"warm-up + {args.duration:g} s counted per rate, then up to {args.drain:g} s for "
        f"answers; at most {args.bound:,} in flight per sender; shares of the scheduled requests",
    ]
    if capacity is not None:
        how = "given" if args.capacity else f"closed loop of {CAPACITY_IN_FLIGHT} in flight"
        lines.append(f"- capacity: {capacity:,.0f} req/s ({how})")
    return lines


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, value


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", help="a running server's REST root, http://HOST:PORT")
    parser.add_argument("--grpc", help="that server's gRPC HOST:PORT")
    parser.add_argument(
        "--start",
        choices=("fold", "fold-off", "naive", "kserve", "mlserver"),
        help="start this server here (the peers take --encoding json)",
    )
    parser.add_argument("--env", type=key_value, action="append", default=[], help="KEY=VALUE")
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--protocol", choices=("rest", "grpc"), default="rest")
    parser.add_argument("--encoding", choices=("binary", "json"), default="binary")
    rates = parser.add_mutually_exclusive_group(required=True)
    rates.add_argument("--rates", type=floats, help="offered requests/s, e.g. 100,200,400")
    rates.add_argument("--capacity-multiples", type=floats, help="of --capacity: 0.5,1,2,4")
    parser.add_argument("--capacity", type=float, help="req/s (default: measured first)")
    parser.add_argument("--duration", type=float, default=8.0, help="counted s per rate")
    parser.add_argument("--warmup", type=float, default=2.0, help="uncounted s per rate")
    parser.add_argument("--drain", type=float, default=5.0, help="s to wait for answers")
    parser.add_argument("--target-ms", type=float, help="goodput: 2xx within it (default: all)")
    parser.add_argument(
        "--no-deadline",
        action="store_true",
        help="count goodput within --target-ms, but send no deadline (grpc-timeout, "
        "parameters.timeout): a client that waits, as today's clients of a server without one",
    )
    parser.add_argument("--senders", type=int, default=1, help="sender processes")
    parser.add_argument("--bound", type=int, default=MAX_IN_FLIGHT, help="in flight/sender")
    parser.add_argument("--json", type=Path, help="write every cell here")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args()
    args.env = dict(args.env)
    if (args.url is None) == (args.start is None):
        parser.error("give either --url of a running server or --start")
    return args


def measure(args: argparse.Namespace, url: str, grpc_target: str | None) -> list[Cell]:
    """Every rate in turn, a row printed as each is done."""
    request = prepare_request(args, url, grpc_target)
    if request.protocol == "grpc":
        wait_grpc(request)
    else:  # one connection, so one descriptor, per request in flight
        args.bound = min(args.bound, resource.getrlimit(resource.RLIMIT_NOFILE)[1] - FD_RESERVE)
    capacity = args.capacity
    if args.capacity_multiples and capacity is None:
        capacity = run_loop(lambda: closed_loop_rate(request, CAPACITY_IN_FLIGHT, CAPACITY_SECONDS))
    rates = args.rates or [m * capacity for m in args.capacity_multiples]
    lines = conditions(args, request, capacity)
    print("\n".join([*lines, text_line(HEADER)]), flush=True)
    target_s = None if args.target_ms is None else args.target_ms / 1e3
    cells = []
    for rate in rates:
        before = scrape_dropped(url, args.model)
        tallies = run_senders(request, rate, args)
        dropped = delta(before, scrape_dropped(url, args.model))
        cells.append(summarize(rate, args.duration, tallies, target_s, dropped))
        print(text_line(row(cells[-1])), flush=True)
    for cell in cells:
        if cell.first_error:
            print(f"first error at {cell.offered:,.0f}/s: {cell.first_error}")
    if args.markdown:
        table = ["| " + " | ".join(line) + " |" for line in [HEADER, *map(row, cells)]]
        print("\n".join(["", *lines, "", table[0], "|" + "---|" * len(HEADER), *table[1:]]))
    if args.json:
        figures = {"conditions": lines, "capacity": capacity, "cells": [asdict(c) for c in cells]}
        args.json.write_text(json.dumps(figures, indent=2))
    return cells


def main() -> None:
    args = parse_args()
    # SIGTERM unwinds like an error, so a server started here is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))
    with tempfile.TemporaryDirectory(prefix="open-loop-") as tmp:
        running, url, grpc_target = None, args.url, args.grpc
        if args.start:
            running, grpc_target = start_server(args, Path(tmp))
            url = running.url
        try:
            measure(args, url.rstrip("/"), grpc_target)
        except Exception:
            if running is not None:
                print(running.log_path.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            if running is not None:
                servers.stop(running)


if __name__ == "__main__":
    main()
