"""This worker's gRPC server: created in its running event loop, stopped with the app.

Each worker process serves gRPC beside HTTP, on one port shared by every worker
(grpcio binds with ``SO_REUSEPORT`` on Linux, so the kernel spreads connections over
the workers, as for HTTP in :mod:`service.process.listeners`). The server is created
in the worker's running event loop, at start-up, and stopped at shutdown through its
:class:`~service.grpc.gate.CallGate`: in-flight calls finish, new ones get UNAVAILABLE.
The services it serves are in :mod:`service.grpc.servicer`.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2_grpc
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.dataplane.plane import DataPlane
from service.grpc.gate import CallGate
from service.grpc.servicer import HealthServicer, InferenceServicer
from service.settings import Settings

log = logging.getLogger(__name__)


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcService:
    """This worker's gRPC server, started and stopped with the app."""

    def __init__(self, server: grpc.aio.Server, calls: CallGate, port: int) -> None:
        self.server = server
        self.calls = calls
        self.port = port

    async def stop(self, grace_s: float) -> None:
        await self.calls.stop(self.server, grace_s)


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
    calls = CallGate()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(dataplane, settings, version, calls), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(dataplane), server)
    address = grpc_address(settings.host, settings.grpc_port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as err:
        raise OSError(f"gRPC cannot listen on {address}: {err}") from err
    await server.start()
    log.info("gRPC listening on %s", grpc_address(settings.host, port))
    return GrpcService(server, calls, port)
