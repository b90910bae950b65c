"""What the per-request access log costs through real HTTP: FoldServe with its defaults
(access log on) against ``--no-access-log``, both started side by side, the two
measured in alternation with wrk at 64 clients.

    python bench/access_log_http.py [--repository models] [--model digits_cnn]
        [--seconds 10] [--rounds 3] [--log-format text|json]

Prints each round's req/s, p50/p99 and server CPU per request for both settings, and
the ratio "log on / log off" (throughput: 1.00 means the log costs nothing; the issue's
target is at least 0.95). The log goes to a file, as in bench/throughput.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import throughput_load as load
import throughput_servers as servers
from throughput import QUIET_CORES, measure, running


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    parser.add_argument("--retries", type=int, default=1, help="re-measure a busy cell")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    repository = args.repository.resolve()
    base = [sys.executable, "-m", "service", "--repository", str(repository)]
    base += ["--providers", "cpu", "--log-format", args.log_format]
    specs = [
        servers.ServerSpec("log-on", "access log on (default)", base),
        servers.ServerSpec("log-off", "--no-access-log", [*base, "--no-access-log"]),
    ]
    name, sample = load.model_input(repository, args.model)
    payload = load.make_payload(name, sample, 1, "json")
    path = f"/v2/models/{args.model}/infer"
    results: dict[str, list[load.LoadResult]] = {s.key: [] for s in specs}
    with tempfile.TemporaryDirectory() as tmp, running(specs, Path(tmp)) as started:
        body = payload.write(Path(tmp), args.model)
        for server in started.values():
            servers.wait_ready(server, path, payload.body, payload.headers)
            load.run_wrk(server.url + path, body, payload.headers, args.clients, 2.0)  # warm
        for round_ in range(args.rounds):
            order = specs if round_ % 2 == 0 else specs[::-1]
            for spec in order:
                cell = measure(
                    started[spec.key], path, body, payload, args.clients, args.seconds, args.retries
                )
                results[spec.key].append(cell)
                print(
                    f"round {round_ + 1}  {spec.label:24s} {cell.rps:8.0f} req/s  "
                    f"p50 {cell.p50_ms:5.1f} ms  p99 {cell.p99_ms:5.1f} ms  "
                    f"cpu {cell.server_cpu_us:5.0f} us/req  other {cell.other_cores:.2f} CPUs  "
                    f"errors {cell.errors}"
                )
    on, off = results["log-on"], results["log-off"]
    ratios = [a.rps / b.rps for a, b in zip(on, off, strict=True)]
    cpu = [a.server_cpu_us / b.server_cpu_us for a, b in zip(on, off, strict=True)]
    print(
        f"\n{args.model}, {args.clients} clients, JSON batch 1, --log-format {args.log_format}, "
        f"{args.rounds} rounds of {args.seconds:.0f} s (cells with other CPUs busy above "
        f"{QUIET_CORES} re-measured up to {args.retries} time(s)):"
    )
    print(
        f"throughput log on / off: {', '.join(f'{r:.3f}' for r in ratios)} "
        f"(median {statistics.median(ratios):.3f}); server CPU per request on / off: "
        f"{', '.join(f'{r:.3f}' for r in cpu)} (median {statistics.median(cpu):.3f})"
    )


if __name__ == "__main__":
    main()
