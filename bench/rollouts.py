"""What clients see while a server rolls: a cold start, a killed worker, a new version, an
unload, and rolling restarts, under open-loop load at a share of the measured capacity.

    python bench/rollouts.py --quick --json /tmp/rollouts-quick.json  # ~1 min, REST only
    python bench/rollouts.py --seconds 5 --json /tmp/rollouts.json    # every event, transport
    python bench/rollouts.py --root ../before --json /tmp/before.json # another checkout

``python -m service --workers 2``, run from ``--root`` (a git worktree: the same bench
measures the code before a change), serves the repository's breast_cancer MLP and a second
model (bench/rollouts_server.py). Its capacity per transport is measured first (a closed
loop); then for each transport (REST with a new connection per request, REST keep-alive,
gRPC) one sender process sends on a Poisson schedule at ``--load`` of it, each request
timed from its scheduled send, while the events (bench/rollouts_events.py) come one after
another. Before each, the sender pauses until every request out is answered (an event
starts from the steady state, not from the backlog of the one before), sends 1 s more,
then the steady window of ``--seconds`` the event is compared with:

- ``cold``: the sender keeps trying (refused at first) from the server process's start;
  the event is the first 200 of ``GET /v2/health/ready``; its steady window comes after;
- ``kill``: SIGKILL to one worker (uvicorn's supervisor starts another);
- ``load``: a new version written into the repository and loaded over HTTP (API key);
- ``unload``: the second model unloaded, a share of the requests going to it meanwhile;
- ``hup``: SIGHUP to the supervisor (uvicorn 0.55 replaces each worker, the new one ready
  before the old one is stopped);
- ``term``: SIGTERM to one worker at a time, the next once its replacement listens.

Per event: requests sent in its window (from the event until capacity is back, at least
2 s), failures by kind with those on a listening socket as it closed counted apart,
answers unlike the version they name or from a version already unloaded (both must be 0),
p50/p99 against the steady window's, and when capacity was back (bench/rollouts_report.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import throughput_load as load
from open_loop import run_loop
from rollouts_clients import (
    TRANSPORTS,
    Control,
    SenderResult,
    SenderSpec,
    closed_loop_rate,
    sender_main,
)
from rollouts_events import ACTIONS, EVENTS, PROBE_SHARE, WAIT_S, Roll
from rollouts_report import (
    CLOSING_S,
    GOOD_FACTOR,
    GOOD_FLOOR_MS,
    GOOD_SHARE,
    SUSTAIN_S,
    EventReport,
    decode,
    event_report,
    markdown,
    run_totals,
)
from rollouts_server import (
    MODEL,
    OTHER,
    Repository,
    Server,
    SocketWatch,
    grpc_body,
    prepare_repository,
    read_answer,
    rest_body,
    start_server,
    stop_server,
    wait_for,
)
from throughput_servers import BENCH, wait_ready

CAPACITY_IN_FLIGHT = 32


def sender_spec(transport: str, server: Server, repo: Repository, rate: float) -> SenderSpec:
    if transport == "grpc":
        bodies = (grpc_body(MODEL, repo.x), grpc_body(OTHER, repo.x))
    else:
        bodies = (rest_body(repo.x),) * 2
    target = f"127.0.0.1:{server.grpc_port}"
    return SenderSpec(transport, server.url, target, (MODEL, OTHER), bodies, rate)


@contextmanager
def sender_process(out: list[SenderResult]) -> Iterator[Control]:
    """A sender process, imported and waiting for its SenderSpec on ``control.specs``; it
    sends until the block ends, and its result is appended to ``out``."""
    ctx = mp.get_context("spawn")
    events = ctx.Event(), ctx.Event(), ctx.Event()
    shared = ctx.RawValue("b", 0), ctx.RawValue("i", 0), ctx.RawValue("d", 0.0)
    control = Control(ctx.Queue(), *events, *shared, ctx.Queue())
    proc = ctx.Process(target=sender_main, args=(control,))
    proc.start()
    try:
        if not control.imported.wait(60):
            raise RuntimeError("the sender process did not start")
        yield control
    finally:
        control.stop.set()
        if control.started.is_set():
            out.append(control.results.get(timeout=60))
        else:
            proc.terminate()
        proc.join()


def go(control: Control, spec: SenderSpec) -> None:
    control.specs.put(spec)
    if not control.started.wait(60):
        raise RuntimeError("the sender process did not begin sending")


def serving(server: Server, watch: SocketWatch, repo: Repository) -> None:
    """Until every worker listens and answers (16 answers in a row on new connections)."""
    wait_for(watch.all_listening, WAIT_S, "every worker listening", server)
    wait_ready(server.running, f"/v2/models/{MODEL}/infer", rest_body(repo.x), {}, WAIT_S, 0.05)


def capacity(transport: str, server: Server, repo: Repository, seconds: float) -> float:
    spec = sender_spec(transport, server, repo, 0.0)
    rate: float = run_loop(lambda: closed_loop_rate(spec, CAPACITY_IN_FLIGHT, seconds))
    return rate


def roll_transport(
    args: argparse.Namespace, transport: str, rate: float, roll: Roll, servers: list[Server]
) -> tuple[Roll, list[EventReport], dict[str, int]]:
    """Every event on one transport under load, on ``roll``'s server; the roll it ends with
    (a cold start stops that server and starts another, the load already on, appended to
    ``servers``: what the caller stops in the end)."""
    results: list[SenderResult] = []
    cold = "cold" in args.events
    server, repo = roll.server, roll.repo
    with sender_process(results) as control:
        if cold:
            stop_server(server)
            server = start_server(args.root, repo.root, args.workdir, args.workers, args.env)
            servers.append(server)
        go(control, sender_spec(transport, server, repo, rate))
        with SocketWatch(server) as watch:
            # what was unloaded on the same server still is (a new one has loaded it all)
            retired = [] if cold else roll.retired
            roll = Roll(server, watch, repo, args.seconds, control, retired=retired)
            for event in args.events:
                print(f"{transport}: {event}", file=sys.stderr, flush=True)
                ACTIONS[event](roll)
    result = results[0]
    read = partial(read_answer, grpc=transport == "grpc")
    answers = decode(result.bodies, read, repo.expected)
    reports = [
        event_report(transport, rate, result.records, answers, m, roll.retired) for m in roll.marks
    ]
    totals = run_totals(result.records, answers, roll.retired)
    totals |= {"late_sends": result.late, "max_in_flight": result.max_in_flight}
    return roll, reports, totals


def conditions(
    args: argparse.Namespace, began: datetime, load_average: float, capacities: dict[str, float]
) -> list[str]:
    env = " ".join(f"{k}={v}" for k, v in args.env.items()) or "none"
    return [
        f"- date: {began:%Y-%m-%d %H:%M} UTC; command: python bench/rollouts.py "
        f"{' '.join(sys.argv[1:])}",
        f"- machine: {load.cpu_model()}, {len(os.sched_getaffinity(0))} usable CPUs; load "
        f"average {load_average:.2f} at the start",
        f"- server: python -m service --workers {args.workers} --providers cpu --threads 1 from "
        f"{args.root}; env: {env}; {MODEL} batch 1 (JSON over REST, raw over gRPC)",
        "- capacity (closed loop of "
        f"{CAPACITY_IN_FLIGHT}): " + ", ".join(f"{t} {c:,.0f}/s" for t, c in capacities.items()),
        f"- load: one sender process, Poisson arrivals at {args.load:.0%} of it, timed from "
        f"each scheduled send; steady windows of {args.seconds:g} s; {PROBE_SHARE:.0%} of the "
        f"requests to {OTHER} around its unload",
        f"- on the closing socket: a connection reset or closed without an answer, opened before "
        f"a listening socket closed, answered within {CLOSING_S:g} s of it; capacity back: every "
        f"worker listening and, from then on, every {SUSTAIN_S:g} s of requests {GOOD_SHARE:.0%} "
        f"answered 2xx within max({GOOD_FACTOR:g} x the steady p99, {GOOD_FLOOR_MS:g} ms)",
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    began, load_average = datetime.now(UTC), os.getloadavg()[0]
    versions = len(args.transport) if "load" in args.events else 0
    repo = prepare_repository(args.workdir, versions)
    server = start_server(args.root, repo.root, args.workdir, args.workers, args.env)
    servers = [server]
    reports: list[EventReport] = []
    totals: dict[str, dict[str, int]] = {}
    try:
        with SocketWatch(server) as watch:
            serving(server, watch, repo)
            seconds = args.capacity_seconds
            capacities = {t: capacity(t, server, repo, seconds) for t in args.transport}
            roll = Roll(server, watch, repo, args.seconds, None)
        for transport in args.transport:
            rate = args.load * capacities[transport]
            roll, rows, totals[transport] = roll_transport(args, transport, rate, roll, servers)
            reports += rows
    finally:
        for started in servers:  # stopped already, but for the last
            stop_server(started)
    return {
        "conditions": conditions(args, began, load_average, capacities),
        "capacity_per_s": capacities,
        "events": [asdict(r) for r in reports],
        "totals": totals,
    }


def names(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        chosen = [t for t in text.split(",") if t]
        unknown = set(chosen) - set(choices)
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"choose among {', '.join(choices)}")
        return [c for c in choices if c in chosen]  # in their order: cold first

    return parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=BENCH.parent, help="checkout to serve")
    parser.add_argument("--quick", action="store_true", help="short windows, one transport")
    parser.add_argument("--transport", type=names(TRANSPORTS), help=",".join(TRANSPORTS))
    parser.add_argument("--events", type=names(EVENTS), default=list(EVENTS), help=",".join(EVENTS))
    parser.add_argument("--seconds", type=float, help="steady window, and load after (5; quick 1)")
    parser.add_argument("--load", type=float, default=0.8, help="share of the capacity offered")
    parser.add_argument("--capacity-seconds", type=float, help="closed loop (3; quick 1.5)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--drain-seconds",
        type=float,
        help="the server's FOLDSERVE_DRAIN_SECONDS (default: its own; quick: 1)",
    )
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--workdir", type=Path, help="keep the repository and logs here")
    args = parser.parse_args()
    quick = args.quick
    args.transport = args.transport or (["rest-new"] if quick else list(TRANSPORTS))
    args.seconds = args.seconds or (1.0 if quick else 5.0)
    args.capacity_seconds = args.capacity_seconds or (1.5 if quick else 3.0)
    if args.drain_seconds is None and quick:
        args.drain_seconds = 1.0
    args.env = {} if args.drain_seconds is None else {
        "FOLDSERVE_DRAIN_SECONDS": f"{args.drain_seconds:g}"
    }  # fmt: skip
    return args


def main() -> None:
    args = parse_args()
    # SIGTERM unwinds like an error, so the server started here is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))
    with tempfile.TemporaryDirectory(prefix="rollouts-") as tmp:
        args.workdir = (args.workdir or Path(tmp)).resolve()
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run(args)
    print("\n".join(report["conditions"]))
    print()
    print(markdown([EventReport(**e) for e in report["events"]]))
    print()
    for transport, total in report["totals"].items():
        print(f"{transport}, the whole run: " + ", ".join(f"{k} {v:,}" for k, v in total.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
