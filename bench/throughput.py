"""Side-by-side serving throughput: FoldServe against the servers people would pick instead.

    python bench/throughput.py                  # the full run (about 10 minutes)
    python bench/throughput.py --quick          # a smoke run (2 s per cell)
    python bench/throughput.py --record docs/benchmarks.md   # also write the table there
    python bench/throughput.py --baseline ../before   # add FoldServe as another checkout has it

One run, one machine, the same model files and the same load generator (wrk,
closed loop, 127.0.0.1) for every server:

1. the HTTP floor: a bare FastAPI endpoint on uvicorn answering a constant;
2. a naive FastAPI + pydantic + ONNX Runtime server (no batching);
3. Seldon MLServer with a custom runtime running the same file in ONNX
   Runtime (from bench/.venv-mlserver, created on first use);
4. KServe's ModelServer with a custom model running the same file in ONNX
   Runtime (from bench/.venv-kserve, created on first use);
5. FoldServe as started by default (access log on), JSON tensors with dynamic
   batching off and on; FoldServe with binary tensors.

All servers start together and stay idle while another is measured; each
cell (model, clients) measures them back to back, so slow drift in the
machine's load hits every row alike. Each request carries one sample, except
the extra batch-32 rows that compare JSON with binary tensors. Raw ONNX
Runtime's own rate (back-to-back calls, batch 1 and 32) is the compute limit,
and with the floor's CPU per request it gives the bound no server can pass
(``throughput_report.Bound``): each row's share of it is in the table.
The table, the ratios against the issue's targets, the machine and its load
average are printed (and written between ``<!-- throughput:start -->`` and
``<!-- throughput:end -->`` with ``--record``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnxruntime as ort
import throughput_load as load
import throughput_servers as servers
from markdown_section import write_section
from throughput_report import END, START, Cell, Row, bound_for, model_table, targets

from service.process.machine import usable_cpus

QUIET_CORES = 0.25  # a cell measured while other processes took more CPU than this is redone


def rows_for(model: str, batch_model: str, big_batch: int, keys: list[str]) -> list[Row]:
    labels = {
        "floor": "HTTP floor (FastAPI constant)",
        "naive": "naive FastAPI + pydantic + ORT",
        "mlserver": "MLServer + ORT (custom runtime)",
        "kserve": "KServe ModelServer + ORT",
        "fold-off": "FoldServe JSON, batching off",
        "fold": "FoldServe JSON, batching on",
        "fold-base": "FoldServe JSON, batching on, baseline",
    }
    rows = [Row(key, labels[key], "json", 1) for key in keys]
    rows.append(Row("fold", "FoldServe binary, batching on", "binary", 1))
    if "fold-base" in keys:
        rows.append(Row("fold-base", "FoldServe binary, batching on, baseline", "binary", 1))
    if model == batch_model:
        rows.append(Row("fold", f"FoldServe JSON, batch-{big_batch} requests", "json", big_batch))
        rows.append(
            Row("fold", f"FoldServe binary, batch-{big_batch} requests", "binary", big_batch)
        )
    return rows


def conditions(args: argparse.Namespace, kserve: str, mlserver: str) -> list[str]:
    cpu = load.cpu_model()
    wrk = load.require_wrk()
    return [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; host: {platform.node()}",
        f"machine: {cpu}, {os.cpu_count()} CPUs ({usable_cpus()} usable), {platform.machine()}",
        f"python {platform.python_version()}, onnxruntime {ort.__version__}, "
        f"fastapi {version('fastapi')}, uvicorn {version('uvicorn')}, kserve {kserve}, "
        f"mlserver {mlserver}, "
        f"load generator: {wrk} (1 thread, closed loop, keep-alive)",
        f"each cell: {args.duration:g} s after a {args.warmup:g} s warm-up per server and model; "
        f"{args.workers} process(es) for FoldServe and the floor, {args.peer_workers} for the "
        "naive server and KServe, MLServer's default (1 inference worker); ONNX Runtime on "
        "the CPU everywhere; FoldServe with its defaults (access log on, to a file)",
        f"load average before: {load_average()}",
    ]


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def measure(
    server: servers.RunningServer,
    path: str,
    body: Path,
    payload: load.Payload,
    clients: int,
    seconds: float,
    retries: int,
) -> load.LoadResult:
    """One cell; measured again (up to ``retries`` times) while other processes take
    more than ``QUIET_CORES`` of the machine, keeping the quietest try."""
    best: load.LoadResult | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(5.0)
        cpu, wrk = server.cpu_seconds(), load.children_cpu_seconds()
        busy = load.machine_busy_seconds()
        raw = load.run_wrk(server.url + path, body, payload.headers, clients, seconds)
        cpu = server.cpu_seconds() - cpu
        wrk = load.children_cpu_seconds() - wrk
        other = load.machine_busy_seconds() - busy - cpu - wrk
        result = load.summarize(raw, cpu, other)
        if best is None or result.other_cores < best.other_cores:
            best = result
        if best.other_cores <= QUIET_CORES:
            break
    assert best is not None
    return best


def check_answer(
    server: servers.RunningServer, path: str, payload: load.Payload, model: Path
) -> None:
    """The server's answer equals ONNX Runtime's own on the payload (JSON answers only)."""
    if payload.kind != "json":
        return
    answer = servers.json_outputs(servers.post(server.url + path, payload.body, payload.headers))
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: payload.inputs})
    for out, want in zip(session.get_outputs(), expected, strict=True):
        got = np.asarray(answer[out.name]["data"], dtype=np.float32).reshape(want.shape)
        if not np.allclose(got, want, atol=1e-4):
            raise RuntimeError(f"{server.spec.label} answers {out.name} wrongly")


@contextlib.contextmanager
def running(
    specs: list[servers.ServerSpec], log_dir: Path
) -> Iterator[dict[str, servers.RunningServer]]:
    started: dict[str, servers.RunningServer] = {}
    try:
        for spec in specs:
            started[spec.key] = servers.start(spec, log_dir)
        yield started
    finally:
        for server in started.values():
            servers.stop(server)


def measure_model(
    args: argparse.Namespace,
    repository: Path,
    model: str,
    rows: list[Row],
    live: dict[str, servers.RunningServer],
    clients: list[int],
    workdir: Path,
) -> list[Cell]:
    """Every row of ``model``'s table at every client count, servers back to back per count."""
    name, sample = load.model_input(repository, model)
    path = f"/v2/models/{model}/infer"
    payloads = {(r.kind, r.batch): load.make_payload(name, sample, r.batch, r.kind) for r in rows}
    bodies = {k: p.write(workdir, model) for k, p in payloads.items()}
    probe = payloads[("json", 1)]
    for server_key, server in live.items():
        servers.wait_ready(server, path, probe.body, probe.headers)
        if server_key != "floor":
            check_answer(server, path, probe, load.model_file(repository, model))
    for row in rows:  # warm-up: sessions, caches, and the batchers' first batches
        key = (row.kind, row.batch)
        url = live[row.server].url + path
        load.run_wrk(url, bodies[key], payloads[key].headers, clients[-1], args.warmup)
    cells = []
    for c in clients:
        for row in rows:
            key = (row.kind, row.batch)
            server = live[row.server]
            r = measure(server, path, bodies[key], payloads[key], c, args.duration, args.retries)
            cells.append(Cell(model, row, c, r))
            print(
                f"{model:14s} {c:3d} clients  {row.label:38s} {r.rps:8.0f} req/s  "
                f"p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms  "
                f"cpu {r.server_cpu_us:6.0f} us/req  other {r.other_cores:.2f} CPUs  "
                f"errors {r.errors}",
                flush=True,
            )
    return cells


def raw_ort(
    repository: Path,
    models: list[str],
    batch: int,
    seconds: float,
    best: dict[str, dict[int, load.RawRate]],
) -> dict[str, dict[int, load.RawRate]]:
    """Raw ONNX Runtime per model at batch 1 and ``batch``: the faster of this measurement
    and ``best`` (measured before and after the servers ran, it is the compute limit as the
    machine's load allowed it)."""
    out: dict[str, dict[int, load.RawRate]] = {}
    for model in models:
        _, sample = load.model_input(repository, model)
        path = load.model_file(repository, model)
        out[model] = {}
        for b in (1, batch):
            raw = load.raw_ort_rate(path, sample, b, usable_cpus(), max(3.0, seconds))
            earlier = best.get(model, {}).get(b)
            out[model][b] = raw if earlier is None or raw.rate > earlier.rate else earlier
            print(
                f"raw ONNX Runtime, {model}, batch {b}: {raw.rate:,.0f} samples/s, "
                f"{raw.cpu_us:.0f} us CPU/sample",
                flush=True,
            )
    return out


def json_decode_us(repository: Path, model: str) -> float:
    """FoldServe's CPU per decoding of ``model``'s batch-1 JSON body (this checkout)."""
    name, sample = load.model_input(repository, model)
    return load.decode_cpu_us(load.make_payload(name, sample, 1, "json"), servers.ROOT)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument(
        "--models", default="digits_cnn,resnet_bench", help="tiny model, heavy model"
    )
    parser.add_argument("--concurrency", default="1,8,64", help="clients per cell")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per cell")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds per server and model")
    parser.add_argument("--batch", type=int, default=32, help="the JSON-vs-binary request batch")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes of FoldServe and the floor (0: FoldServe's default for this machine)",
    )
    parser.add_argument(
        "--peer-workers",
        type=int,
        default=1,
        help="processes of the naive server and KServe (1: their defaults)",
    )
    parser.add_argument("--no-kserve", action="store_true", help="leave KServe out")
    parser.add_argument("--no-mlserver", action="store_true", help="leave MLServer out")
    parser.add_argument(
        "--retries", type=int, default=2, help="re-measure a cell while other processes are busy"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (git worktree of an earlier commit): adds its FoldServe rows",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s cells, 1 s warm-up")
    parser.add_argument("--record", type=Path, help="write the table into this markdown file")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = 2.0, 1.0
    args.workers = args.workers or min(8, usable_cpus())  # service/__main__.py's default
    return args


def main() -> None:
    args = parse_args()
    models = args.models.split(",")
    tiny, heavy = models[0], models[-1]
    clients = [int(c) for c in args.concurrency.split(",")]
    repository = args.repository.resolve()
    load.require_wrk()
    specs = servers.server_specs(
        repository,
        args.workers,
        args.peer_workers,
        not args.no_kserve,
        sys.stderr,
        args.baseline,
        with_mlserver=not args.no_mlserver,
    )
    kserve = mlserver = "not run"
    if not args.no_kserve:
        kserve = servers.pip_version(servers.KSERVE_VENV / "bin" / "python", "kserve")
    if not args.no_mlserver:
        mlserver = servers.pip_version(servers.MLSERVER_VENV / "bin" / "python", "mlserver")
    header = conditions(args, kserve, mlserver)
    print("\n".join(header), flush=True)

    raw = raw_ort(repository, models, args.batch, args.warmup, {})

    cells: list[Cell] = []
    with (
        tempfile.TemporaryDirectory(prefix="throughput-") as tmp,
        running(specs, Path(tmp)) as live,
    ):
        for model in models:
            rows = rows_for(model, heavy, args.batch, [s.key for s in specs])
            cells += measure_model(args, repository, model, rows, live, clients, Path(tmp))

    raw = raw_ort(repository, models, args.batch, args.warmup, raw)  # again, servers gone
    report = [f"- {line}" for line in [*header, f"load average after: {load_average()}"]]
    report.append("")
    bounds = {
        model: bound_for(model, cells, raw[model], json_decode_us(repository, model), clients[-1])
        for model in models
    }
    for model in models:
        report += [*model_table(model, cells, clients, raw[model], bounds[model]), ""]
    report += targets(cells, raw, bounds, tiny, heavy, args.batch, clients[-1])
    text = "\n".join(report)
    print("\n" + text)
    if args.record:
        write_section(args.record, START, END, text)
        print(f"\nrecorded in {args.record}")


if __name__ == "__main__":
    main()
