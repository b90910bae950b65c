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
import asyncio
import contextlib
import importlib.util
import logging
import os
import socket
import textwrap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError

from service.observability.logs import configure_logging
from service.process.listeners import WorkerListeners, reserve_port, reuse_port_supported
from service.process.machine import usable_cpus
from service.process.runtime_dir import open_runtime_dir
from service.process.supervisor import HealthPort, Supervisor
from service.rest.connections import GuardedHttpProtocol
from service.settings import Settings, describe_management, get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("service")

# workers=0: one server process per usable CPU, at most this many. One event loop is the
# bottleneck of a small model's requests long before ONNX Runtime is (docs/throughput.md).
MAX_AUTO_WORKERS = 8


# Each flag sets the Settings field of the same name; its help comes from that field.
FLAGS: dict[str, dict[str, Any]] = {
    "repository": {},
    "host": {},
    "port": {"type": int},
    "grpc_port": {"type": int},
    "health_port": {"type": int},
    "providers": {"choices": ["auto", "cuda", "cpu"]},
    "threads": {"type": int},
    "io_binding": {"choices": ["auto", "on", "off"]},
    "max_request_bytes": {"type": int},
    "log_format": {"choices": ["text", "json"]},
    "log_level": {"choices": ["debug", "info", "warning", "error"]},
    "poll_interval": {"type": float},
    "access_log": {"action": argparse.BooleanOptionalAction},
    "drain_seconds": {"type": float},
    "runtime_dir": {},
    "workers": {"type": int},
    "batching": {"action": argparse.BooleanOptionalAction},
    "max_batch_size": {"type": int},
    "max_queue_delay_us": {"type": int},
    "max_queue_size": {"type": int},
    "max_concurrency": {"type": int},
    "latency_target_ms": {"type": float},
    "request_timeout_ms": {"type": float},
    "header_timeout": {"type": float},
    "body_timeout": {"type": float},
    "max_connections": {"type": int},
}


def setting_help(name: str, *, env: bool = True) -> str:
    """A setting's description, default and environment variable, for ``--help``."""
    field = Settings.model_fields[name]
    text = field.description or name
    if "default:" not in text:
        default = field.default
        shown = "none" if default is None else default
        text += f" (default: {str(shown).lower() if isinstance(shown, bool) else shown})"
    return f"{text}; env FOLDSERVE_{name.upper()}" if env else text


def build_parser(prog: str = "python -m service") -> argparse.ArgumentParser:
    """The command line: a flag per setting in :data:`FLAGS`; the settings that are only
    read from the environment (a secret, rarely changed limits) are listed after them."""
    env_only = [name for name in Settings.model_fields if name not in FLAGS]
    epilog = ["settings read from the environment (or .env) only:"] + [
        textwrap.fill(
            f"FOLDSERVE_{name.upper()}: {setting_help(name, env=False)}",
            width=78,
            initial_indent="  ",
            subsequent_indent="      ",
        )
        for name in env_only
    ]
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the folded models of a FoldServe repository. Every flag overrides "
        "its FOLDSERVE_* environment variable (and .env); a flag left out keeps it.",
        epilog="\n".join(epilog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, kwargs in FLAGS.items():
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, help=setting_help(name).replace("%", "%%"), **kwargs)
    return parser


def parse_args(
    argv: Sequence[str] | None = None, prog: str = "python -m service"
) -> dict[str, Any]:
    """The flags given on the command line, as Settings field overrides."""
    args = build_parser(prog).parse_args(argv)
    return {key: value for key, value in vars(args).items() if value is not None}


def worker_count(settings: Settings) -> int:
    """``settings.workers``, or for 0 one process per usable CPU (at most ``MAX_AUTO_WORKERS``)."""
    return settings.workers or min(MAX_AUTO_WORKERS, usable_cpus())


def worker_app() -> FastAPI:
    """The app of one worker process (``uvicorn --factory``): settings from the environment."""
    from service.app import create_app  # not in the supervisor, which serves no requests

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


def _http_protocol(http: str) -> str | type[asyncio.Protocol]:
    """The httptools protocol with the connection limits (service.rest.connections); h11 without
    them, said in the log."""
    if http != "httptools":
        log.warning(
            "httptools is not installed: no time limits on request headers and bodies, "
            "and no bound on connections per worker (pip install 'uvicorn[standard]')"
        )
        return http
    return GuardedHttpProtocol


def main(argv: Sequence[str] | None = None, prog: str = "python -m service") -> None:
    """Serve; ``prog`` is the command's name in usage and error lines (``foldserve serve``)."""
    flags = parse_args(argv, prog)
    try:
        settings = Settings(**flags)
    except ValidationError as err:
        raise SystemExit(f"{prog}: invalid settings\n{err}") from err
    configure_logging(settings.log_format, settings.log_level)
    log.info(describe_management(settings))
    workers = worker_count(settings)
    loop, http = _event_loop()
    server: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": loop,
        "http": _http_protocol(http),
        "log_config": None,
        "access_log": False,  # the request middleware logs each request with its id
        "server_header": False,
    }
    # The gRPC port: taken by another server, it fails here, with a clear message, rather
    # than joining that server's SO_REUSEPORT group. Held while the workers serve.
    with grpc_port_held(settings, prog):
        if workers == 1:
            serve_one(settings, server, loop, http, prog)
            return
        serve_workers(settings, flags, workers, server, loop, http, prog)


def serve_one(settings: Settings, server: dict[str, Any], loop: str, http: str, prog: str) -> None:
    """One worker, no supervisor: its port is held (bound) from the start, and listened on
    once its models are loaded; its health port, if any, is its own (``service.app``)."""
    from service.app import create_app

    log.info("serving with 1 worker, %s loop, %s parser", loop, http)
    config = uvicorn.Config(create_app(settings), **server)
    if not reuse_port_supported():
        uvicorn.Server(config).run()
        return
    with held_port(config, prog) as held:
        uvicorn.Server(config).run(sockets=[held])


def held_port(config: uvicorn.Config, prog: str) -> socket.socket:
    """The serving port, bound and not listening (the command fails here when it is taken)."""
    try:
        return reserve_port(config.host, config.port)
    except OSError as err:
        raise SystemExit(f"{prog}: cannot listen on {config.host}:{config.port}: {err}") from err


def health_port(settings: Settings, check: Callable[[], str | None], prog: str) -> HealthPort:
    """The supervisor's liveness port (``service.process.supervisor``)."""
    try:
        return HealthPort(settings.host, settings.health_port, check)
    except OSError as err:
        raise SystemExit(
            f"{prog}: cannot serve liveness on {settings.host}:{settings.health_port}: {err}"
        ) from err


def grpc_port_held(settings: Settings, prog: str) -> contextlib.AbstractContextManager[object]:
    """A bound, not listening socket on the gRPC port (nothing when gRPC is off); ``prog``
    names the command in the error when the port is taken."""
    if not settings.grpc_port:
        return contextlib.nullcontext()
    try:
        return reserve_port(settings.host, settings.grpc_port)
    except OSError as err:
        raise SystemExit(
            f"{prog}: cannot serve gRPC on {settings.host}:{settings.grpc_port}: "
            f"{err} (--grpc-port 0 turns gRPC off)"
        ) from err


def serve_workers(
    settings: Settings,
    flags: dict[str, Any],
    workers: int,
    server: dict[str, Any],
    loop: str,
    http: str,
    prog: str,
) -> None:
    """Several worker processes under uvicorn's supervisor, each with its own listener."""
    # Each worker reads its settings from the environment: hand the flags over there, with
    # the runtime directory the workers keep in step through and the metrics they sum.
    runtime = open_runtime_dir(settings.runtime_dir)
    flags["runtime_dir"] = runtime.root
    runtime.start_metrics()
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
    os.environ["FOLDSERVE_HEALTH_PORT"] = "0"  # the supervisor answers on it, not a worker
    config = uvicorn.Config("service.__main__:worker_app", factory=True, workers=workers, **server)
    if not reuse_port_supported():
        log.warning(
            "SO_REUSEPORT is not available here: the workers share one listening socket, "
            "listened on before any model is loaded, and connections may split unevenly"
        )
        sockets: list[socket.socket] = [config.bind_socket()]
        supervise(settings, Supervisor(config, sockets, settings.worker_start_timeout), prog)
        return
    # Each worker listens with a socket of its own once its models are loaded
    # (service.process.listeners); this one holds the port while the supervisor runs.
    with held_port(config, prog) as held:
        port = held.getsockname()[1]
        log.info(
            "each worker listens on http://%s:%d with a socket of its own once its models "
            "are loaded (SO_REUSEPORT: the kernel spreads connections over them)",
            config.host,
            port,
        )
        sockets = WorkerListeners(config.host, port)
        supervise(settings, Supervisor(config, sockets, settings.worker_start_timeout), prog)


def supervise(settings: Settings, supervisor: Supervisor, prog: str) -> None:
    """Run the workers, with the health port answering beside them when one is set."""
    if not settings.health_port:
        supervisor.run()
        return
    with health_port(settings, supervisor.liveness, prog):
        supervisor.run()


if __name__ == "__main__":
    main()
