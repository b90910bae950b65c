"""Training throughput in one process against torchrun with several, SyncBatchNorm and plain DDP.

    python bench/distributed_train.py [--processes 2] [--epochs 2] [--repeats 2]

Trains the same model, data and global batch size each way through the real
CLI (``python -m training train``, under ``torchrun`` for ``--distributed``)
and reads ``samples_per_second`` from the run's ``metrics.json`` (training
samples of all processes per second of training steps, validation excluded).
Each configuration runs ``--repeats`` times in turn and the table shows the
median, with the machine's CPUs, load average and date, since it is only as
fair as the machine was quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKLOADS = {
    "cnn/digits": ["--model=cnn", "--dataset=digits"],
    "resnet/synthetic 3x32x32": [
        "--model=resnet",
        "--dataset=synthetic",
        "--shape=3x32x32",
        "--n-samples=1200",
    ],
}


@dataclass(frozen=True)
class Setup:
    label: str
    processes: int
    threads: int  # OMP threads per process
    distributed: bool
    sync_bn: bool = True


def run_once(setup: Setup, workload: list[str], epochs: int, batch: int) -> float:
    """One training run; its samples per second."""
    with tempfile.TemporaryDirectory() as out:
        args = [
            "-m",
            "training",
            "train",
            *workload,
            f"--epochs={epochs}",
            f"--batch-size={batch}",
            "--device=cpu",
            f"--out={out}",
        ]
        if setup.distributed:
            args += ["--distributed", "--sync-bn" if setup.sync_bn else "--no-sync-bn"]
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={setup.processes}",
                *args,
            ]
        else:
            cmd = [sys.executable, *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(setup.threads)}
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        metrics = json.loads((Path(out) / "metrics.json").read_text())
        return float(metrics["samples_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    n = args.processes
    setups = [
        Setup(f"1 process, {n} threads", 1, n, False),
        Setup("1 process, 1 thread", 1, 1, False),
        Setup(f"torchrun {n} x 1 thread, SyncBatchNorm", n, 1, True),
        Setup(f"torchrun {n} x 1 thread, plain DDP", n, 1, True, sync_bn=False),
    ]
    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}: {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}, python {platform.python_version()}"
    )
    print(f"# {' '.join(sys.argv)}; global batch {args.batch_size}, {args.epochs} epochs, CPU")
    print("| workload | setup | samples/s (median) | runs |")
    print("| --- | --- | ---: | --- |")
    for name, workload in WORKLOADS.items():
        results: dict[str, list[float]] = {s.label: [] for s in setups}
        for _ in range(args.repeats):
            for setup in setups:
                results[setup.label].append(run_once(setup, workload, args.epochs, args.batch_size))
        for setup in setups:
            runs = results[setup.label]
            shown = ", ".join(f"{r:.0f}" for r in runs)
            print(f"| {name} | {setup.label} | {statistics.median(runs):.0f} | {shown} |")
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
