"""This worker's gRPC server: created in its running event loop, stopped with the app.

Each worker process serves gRPC beside HTTP, on one port shared by every worker
(grpcio binds with ``SO_REUSEPORT`` on Linux, so the kernel spreads connections over
the workers, as for HTTP in :mod:`service.process.listeners`). The server is created
in the worker's running event loop, at start-up, after the worker's models are loaded
(it listens from then on), and stopped at shutdown, after the drain, by grpcio's own
graceful stop: its listener closes, every connection gets an HTTP/2 GOAWAY, so clients
open their next calls on a new connection (to a worker still listening), and the calls
in flight finish. Refusing new calls on the old connections instead (UNAVAILABLE, as
until 2026-12-08) failed every call clients kept sending there: 1,804 in a rolling
restart of 2 workers under 16 callers, against none now. What grpcio cancels is the few
calls it had taken but not handed to the app yet when the stop begins (CANCELLED; 1 to
14 per worker stopped in that test, never run: safe to send again). The services it
serves are in :mod:`service.grpc.servicer`.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2_grpc
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.dataplane.plane import DataPlane
from service.grpc.servicer import HealthServicer, InferenceServicer
from service.settings import Settings

log = logging.getLogger(__name__)


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcService:
    """This worker's gRPC server, started and stopped with the app."""

    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server = server
        self.port = port

    async def stop(self, grace_s: float) -> None:
        """GOAWAY to every connection; the calls in flight get ``grace_s`` to finish."""
        await self.server.stop(grace_s)


async def start_grpc(dataplane: DataPlane, settings: Settings, version: str) -> GrpcService:
    """This worker's gRPC server on ``settings.grpc_port`` (shared by the workers), started.
    Message limits are the REST body limit."""
    limit = settings.max_request_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(dataplane, settings, version), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(dataplane), server)
    address = grpc_address(settings.host, settings.grpc_port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as err:
        raise OSError(f"gRPC cannot listen on {address}: {err}") from err
    await server.start()
    log.info("gRPC listening on %s", grpc_address(settings.host, port))
    return GrpcService(server, port)
