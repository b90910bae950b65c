"""How evenly a server's worker processes share 64 keep-alive clients, over rounds.

    python bench/worker_spread.py                       # this checkout against the floor
    python bench/worker_spread.py --baseline ../before  # and FoldServe as another checkout has it
    python bench/worker_spread.py --record docs/benchmarks.md

FoldServe (default settings: one worker per CPU, access log on) and the HTTP
floor (``bench/peers/floor.py``: a bare FastAPI constant with the same worker
count) are started once. Each round runs wrk against every server back to
back, opening its connections anew, so each round gets a new split of the
connections over the workers. Per round: requests/s, its ratio to the floor
of the same round, p50, p99, errors, and how FoldServe's requests split over
its workers (each request id names its worker; counted from the access log).
Then, per server and model, the targets: median ratio to the floor, the
spread of req/s over rounds ((max - min) / median), the worst p99/p50.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import throughput_load as load
import throughput_servers as servers
from markdown_section import publish

START, END = "<!-- worker-spread:start -->", "<!-- worker-spread:end -->"
MODELS = {"digits_cnn": "json", "resnet_bench": "binary"}
REQUEST_ID = re.compile(rb"\[([0-9a-f]{16})-[0-9a-f]+\]")


@dataclass(frozen=True)
class Round:
    server: str
    model: str
    number: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    shares: list[int]  # requests per worker, largest first (FoldServe only)


def logged_requests(log: Path, offset: int) -> list[int]:
    """Requests per worker in ``log`` past ``offset``, once the access lines stop coming (the
    workers write them from a thread, a little after the answers)."""
    counts: list[int] = []
    for _ in range(50):
        with log.open("rb") as f:
            f.seek(offset)
            found = collections.Counter(m[1] for m in REQUEST_ID.finditer(f.read()))
        now = sorted(found.values(), reverse=True)
        if now == counts:
            return now
        counts = now
        time.sleep(0.2)
    return counts


def one_round(
    server: servers.RunningServer,
    model: str,
    payload: load.Payload,
    body: Path,
    args: argparse.Namespace,
    number: int,
) -> Round:
    offset = server.log_path.stat().st_size
    path = f"/v2/models/{model}/infer"
    raw = load.run_wrk(server.url + path, body, payload.headers, args.clients, args.duration)
    errors = sum(
        int(raw[k])
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    shares = [] if server.spec.key == "floor" else logged_requests(server.log_path, offset)
    return Round(
        server.spec.key,
        model,
        number,
        raw["requests"] / (raw["duration_us"] / 1e6),
        raw["p50_us"] / 1e3,
        raw["p99_us"] / 1e3,
        errors,
        shares,
    )


def table(rounds: list[Round], args: argparse.Namespace) -> list[str]:
    floor = {(r.model, r.number): r.rps for r in rounds if r.server == "floor"}
    one, five, _ = os.getloadavg()
    lines = [
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {len(os.sched_getaffinity(0))} usable "
        f"CPUs; load average before: {one:.2f} {five:.2f}",
        f"- {args.rounds} rounds; each: wrk, 1 thread, {args.clients} keep-alive clients, "
        f"{args.duration:g} s per server, new connections every round; {args.workers} "
        "worker processes for every server",
        "",
        "| model | server | round | req/s | x floor | p50 ms | p99 ms | p99/p50 | errors | "
        "requests per worker |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rounds, key=lambda r: (r.model, r.server, r.number)):
        share = ", ".join(f"{n / max(sum(r.shares), 1):.0%}" for n in r.shares) or "-"
        lines.append(
            f"| {r.model} | {r.server} | {r.number} | {r.rps:,.0f} | "
            f"{r.rps / floor[(r.model, r.number)]:.2f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
            f"{r.p99_ms / r.p50_ms:.1f} | {r.errors} | {share} |"
        )
    lines.append("")
    groups = sorted({(r.model, r.server) for r in rounds if r.server != "floor"})
    for model, server in groups:
        mine = [r for r in rounds if (r.model, r.server) == (model, server)]
        ratios = [r.rps / floor[(model, r.number)] for r in mine]
        rates = [r.rps for r in mine]
        spread = (max(rates) - min(rates)) / statistics.median(rates)
        tail = max(r.p99_ms / r.p50_ms for r in mine)
        lines.append(
            f"- {model}, {server}: median {statistics.median(ratios):.2f}x the floor "
            f"(target >= 0.85), req/s spread over rounds {spread:.0%} (target <= 15%), "
            f"worst p99/p50 {tail:.1f} (target <= 3), errors {sum(r.errors for r in mine)}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--baseline", type=Path, help="another checkout, served as fold-base")
    parser.add_argument("--record", type=Path, help="write the table into this markdown file")
    args = parser.parse_args()
    repository = args.repository.resolve()
    fold = [sys.executable, "-m", "service", "--repository", str(repository)]
    fold += ["--providers", "cpu", "--workers", str(args.workers)]
    floor = [sys.executable, str(servers.PEERS / "floor.py"), "--workers", str(args.workers)]
    specs = [
        servers.ServerSpec("floor", "HTTP floor", floor),
        servers.ServerSpec("fold", "FoldServe", fold),
    ]
    if args.baseline is not None:
        base = args.baseline.resolve()
        specs.append(servers.ServerSpec("fold-base", "baseline", fold, root=base))
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="spread-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        live = []
        for spec in specs:
            server = servers.start(spec, workdir)
            stack.callback(servers.stop, server)
            live.append(server)
        for model in args.models.split(","):
            name, sample = load.model_input(repository, model)
            payload = load.make_payload(name, sample, 1, MODELS[model])
            body = payload.write(workdir, model)
            path = f"/v2/models/{model}/infer"
            for server in live:
                servers.wait_ready(server, path, payload.body, payload.headers)
                load.run_wrk(server.url + path, body, payload.headers, args.clients, args.warmup)
            for number in range(1, args.rounds + 1):
                for server in live:
                    found = one_round(server, model, payload, body, args, number)
                    rounds.append(found)
                    print(found, flush=True)
    record = args.record or Path(os.devnull)
    publish(table(rounds, args), record, START, END, write=args.record is not None)


if __name__ == "__main__":
    main()
