"""A listening socket of its own for each worker process, on the one shared port.

uvicorn's supervisor binds one socket and hands it to every worker; whichever
worker wakes first accepts, and with keep-alive clients the first split of
connections lasts the whole run, so one worker can be CPU-bound while another
idles (docs/throughput.md). With ``SO_REUSEPORT`` (Linux 3.9+) each worker
binds the port itself and the kernel spreads new connections over the workers'
sockets by a hash of their addresses, as nginx's ``reuseport`` and Triton's
``--reuse-grpc-port`` do. A worker that dies and restarts binds again and so
rejoins the spread.

uvicorn's supervisor (restarts, health checks, signals) is kept: it pickles
the socket list it is given into each worker process it starts, so
:class:`WorkerListeners` is a list whose unpickling, in the new worker, binds
that worker's own socket. The supervisor keeps a bound socket that never
listens, which holds the port (and resolves port 0) while no worker listens.

A worker's socket is bound but does not listen until uvicorn starts serving on
it, which is after the app's lifespan has started, and the lifespan waits for
the worker's first repository scan (``service.app``). The kernel spreads
connections only over listening sockets, so a worker that is still loading,
at start or after a crash, takes no connection: the workers already serving
take them all, and with none serving yet a connection is refused (at once,
which a client or a startup probe retries) rather than answered "still
loading".
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

from uvicorn.config import STARTUP_FAILURE

log = logging.getLogger(__name__)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reuse_port_supported() -> bool:
    """Whether this platform lets several processes listen on one port (SO_REUSEPORT)."""
    if not hasattr(socket, "SO_REUSEPORT"):
        return False
    with socket.socket() as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        except OSError:
            return False
    return True


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening SO_REUSEPORT socket on ``host:port`` (port 0: a free one).

    It first binds the address *without* SO_REUSEPORT, so that a port another
    server already listens on (another FoldServe too, which would otherwise
    join its spread silently) fails here with ``OSError`` (address in use).
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    return _reuse_port_socket(host, port)


def worker_socket(host: str, port: int) -> socket.socket:
    """This worker's own socket on the shared port: bound, listening only once uvicorn
    serves on it (its ``create_server`` calls ``listen``)."""
    sock = _reuse_port_socket(host, port)
    sock.set_inheritable(True)
    return sock


class WorkerListeners(list[socket.socket]):
    """The socket list uvicorn's supervisor hands each worker: empty in the supervisor,
    and in each worker (unpickled there) that worker's own socket."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.address = (host, port)

    def __reduce__(self) -> tuple[Any, ...]:
        return _listen_in_worker, self.address


def _listen_in_worker(host: str, port: int) -> list[socket.socket]:
    try:
        return [worker_socket(host, port)]
    except OSError as err:  # the worker cannot serve: say why, and fail its start-up
        log.error("worker cannot listen on %s:%d: %s", host, port, err)
        sys.exit(STARTUP_FAILURE)  # the supervisor stops instead of restarting it
