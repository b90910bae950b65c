"""CPU per access-log line, every thread of the process counted: the ways to write one.

    python bench/log_cost.py --lines 50000

Each variant runs in a fresh process, writes ``--lines`` access lines (and makes
a request id for each) to a file, and reports the process's CPU time per line
(``time.process_time``: the writer thread's share included), so that moving
work to another thread does not hide it:

- ``sync``: what FoldServe did before: a ``logging.StreamHandler`` on the
  caller's thread, uuid4 request ids;
- ``stdlib-queue``: the standard library's ``QueueHandler`` +
  ``QueueListener`` in front of the same handler, uuid4 ids;
- ``writer-text`` / ``writer-json``: ``service.observability.logs`` (a deque and one writer
  thread, batched writes), per-process prefix + counter ids.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from logging.handlers import QueueHandler, QueueListener
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["sync", "stdlib-queue", "writer-text", "writer-json"]
ARGS = ("POST", "/v2/models/digits_cnn/infer", 200, 1.234)


def child(variant: str, lines: int, out_path: str) -> float:
    sys.path.insert(0, str(ROOT))
    from service.observability import logs

    out = open(out_path, "w")  # noqa: SIM115
    root = logging.getLogger()
    access = logging.getLogger("service.access")

    def stream_handler() -> logging.Handler:
        handler = logging.StreamHandler(out)
        handler.addFilter(logs.RequestIdFilter())
        handler.setFormatter(logging.Formatter(logs.TEXT_FORMAT))
        return handler

    new_id: Callable[[], str] = lambda: uuid.uuid4().hex  # noqa: E731
    stop: Callable[[], None] = lambda: None  # noqa: E731
    emit: Callable[[str], None]
    if variant == "sync":
        root.handlers[:] = [stream_handler()]
        root.setLevel("INFO")
        emit = lambda rid: access.info('"%s %s" %d %.2fms', *ARGS)  # noqa: E731
    elif variant == "stdlib-queue":
        q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        handler = QueueHandler(q)
        handler.addFilter(logs.RequestIdFilter())  # stamped on the caller's thread
        listener = QueueListener(q, stream_handler())
        listener.start()
        stop = listener.stop
        root.handlers[:] = [handler]
        root.setLevel("INFO")
        emit = lambda rid: access.info('"%s %s" %d %.2fms', *ARGS)  # noqa: E731
    else:
        writer = logs.configure_logging(variant.split("-")[1], "info", out)
        stop = writer.stop
        new_id = logs.new_request_id
        emit = lambda rid: logs.log_access(*ARGS, rid)  # noqa: E731

    def write(n: int) -> None:
        for _ in range(n):
            token = logs.request_id_var.set(rid := new_id())
            emit(rid)
            logs.request_id_var.reset(token)

    write(2000)  # warm-up
    start = time.process_time()
    write(lines)
    stop()  # every line written: the writer's work counted
    return (time.process_time() - start) / lines * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(f"{child(args.child, args.lines, args.out):.3f}")
        return
    print(f"CPU us per access line (request id included), best of {args.rounds} rounds")
    print("| variant | us/line |\n|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            best = min(
                float(
                    subprocess.run(
                        [sys.executable, __file__, "--child", variant, "--lines", str(args.lines)]
                        + ["--out", os.path.join(tmp, f"{variant}.log")],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout.strip()
                )
                for _ in range(args.rounds)
            )
            print(f"| {variant} | {best:.2f} |")


if __name__ == "__main__":
    main()
