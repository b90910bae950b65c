"""``python -m service``: command-line flags -> Settings -> uvicorn.

Every flag overrides its ``FOLDSERVE_*`` environment variable (and ``.env``);
a flag left out keeps the environment's value. uvicorn runs on uvloop with the
httptools parser when they are installed (``uvicorn[standard]``). With more than
one worker, each worker process builds its own app (and loads every model)
from the environment, which the flags are copied into, and the CPUs are shared
out between the workers' ONNX Runtime thread pools.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from service.app import create_app
from service.logs import configure_logging
from service.metrics import start_multiprocess
from service.sessions import usable_cpus
from service.settings import Settings, describe_management, get_settings

log = logging.getLogger("service")

# workers=0: one server process per usable CPU, at most this many. One event loop is the
# bottleneck of a small model's requests long before ONNX Runtime is (docs/throughput.md).
MAX_AUTO_WORKERS = 8


def parse_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The flags given on the command line, as Settings field overrides."""
    parser = argparse.ArgumentParser(
        prog="python -m service", description="Serve the folded models of a FoldServe repository."
    )
    parser.add_argument("--repository", help="model repository directory (FOLDSERVE_REPOSITORY)")
    parser.add_argument("--host", help="address to bind (FOLDSERVE_HOST)")
    parser.add_argument("--port", type=int, help="TCP port (FOLDSERVE_PORT)")
    parser.add_argument(
        "--providers",
        choices=["auto", "cuda", "cpu"],
        help="ONNX Runtime provider (FOLDSERVE_PROVIDERS)",
    )
    parser.add_argument("--threads", type=int, help="intra-op threads, 0: auto (FOLDSERVE_THREADS)")
    parser.add_argument(
        "--io-binding",
        choices=["auto", "on", "off"],
        help="ONNX Runtime IO binding (FOLDSERVE_IO_BINDING)",
    )
    parser.add_argument(
        "--max-request-bytes", type=int, help="largest request body (FOLDSERVE_MAX_REQUEST_BYTES)"
    )
    parser.add_argument("--log-format", choices=["text", "json"], help="FOLDSERVE_LOG_FORMAT")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="FOLDSERVE_LOG_LEVEL"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        help="seconds between repository rescans, 0: off (FOLDSERVE_POLL_INTERVAL)",
    )
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        help="one log line per request (FOLDSERVE_ACCESS_LOG)",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        help="after SIGTERM, seconds of serving with readiness 503 before stopping "
        "(FOLDSERVE_DRAIN_SECONDS)",
    )
    parser.add_argument(
        "--runtime-dir",
        help="writable directory the workers keep in step through, default: a fresh "
        "temporary one (FOLDSERVE_RUNTIME_DIR)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="server processes, 0: one per CPU, at most 8 (FOLDSERVE_WORKERS)",
    )
    parser.add_argument(
        "--batching",
        action=argparse.BooleanOptionalAction,
        help="dynamic batching (FOLDSERVE_BATCHING)",
    )
    parser.add_argument(
        "--max-batch-size", type=int, help="samples per batched call (FOLDSERVE_MAX_BATCH_SIZE)"
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        help="how long an idle model holds a partial batch (FOLDSERVE_MAX_QUEUE_DELAY_US)",
    )
    parser.add_argument(
        "--max-queue-size",
        type=int,
        help="queued requests per model version, 503 beyond (FOLDSERVE_MAX_QUEUE_SIZE)",
    )
    parser.add_argument(
        "--request-timeout-ms",
        type=float,
        help="default request deadline, 504 past it, 0: none (FOLDSERVE_REQUEST_TIMEOUT_MS)",
    )
    args = parser.parse_args(argv)
    return {key: value for key, value in vars(args).items() if value is not None}


def worker_count(settings: Settings) -> int:
    """``settings.workers``, or for 0 one process per usable CPU (at most ``MAX_AUTO_WORKERS``)."""
    return settings.workers or min(MAX_AUTO_WORKERS, usable_cpus())


def worker_app() -> FastAPI:
    """The app of one worker process (``uvicorn --factory``): settings from the environment."""
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    # uvicorn set up this worker's logging before calling us: keep its access log off again
    # (the request middleware writes one line per request with its id).
    logging.getLogger("uvicorn.access").propagate = False
    return create_app(settings)


def _event_loop() -> tuple[str, str]:
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def main(argv: Sequence[str] | None = None) -> None:
    flags = parse_args(argv)
    try:
        settings = Settings(**flags)
    except ValidationError as err:
        raise SystemExit(f"python -m service: invalid settings\n{err}") from err
    configure_logging(settings.log_format, settings.log_level)
    log.info(describe_management(settings))
    workers = worker_count(settings)
    loop, http = _event_loop()
    server: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": loop,
        "http": http,
        "log_config": None,
        "access_log": False,  # the request middleware logs each request with its id
        "server_header": False,
    }
    if workers == 1:
        log.info("serving with 1 worker, %s loop, %s parser", loop, http)
        uvicorn.run(create_app(settings), **server)
        return
    # Each worker reads its settings from the environment: hand the flags over there, with
    # the runtime directory the workers keep in step through and the metrics they sum.
    runtime = settings.runtime_dir or Path(tempfile.mkdtemp(prefix="foldserve-runtime-"))
    runtime.mkdir(parents=True, exist_ok=True)
    flags["runtime_dir"] = runtime
    start_multiprocess(runtime / "metrics")
    os.environ.update({f"FOLDSERVE_{k.upper()}": str(v) for k, v in flags.items()})
    if settings.threads == 0:
        os.environ["FOLDSERVE_THREADS"] = str(max(1, usable_cpus() // workers))
    log.info(
        "serving with %d workers of %s ONNX Runtime threads, %s loop, %s parser",
        workers,
        os.environ.get("FOLDSERVE_THREADS", settings.threads),
        loop,
        http,
    )
    uvicorn.run("service.__main__:worker_app", factory=True, workers=workers, **server)


if __name__ == "__main__":
    main()
