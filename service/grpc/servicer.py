"""Triton's ``inference.GRPCInferenceService`` and ``grpc.health.v1``, over the data plane.

Every RPC goes through the same data plane as REST (:mod:`service.dataplane.plane`):
the same batcher, versions, admission, metrics (label ``protocol="grpc"``) and
statistics. Each RPC only decodes (:mod:`service.grpc.codec`), calls the data plane,
encodes, and ends the call with the gRPC status of the data plane's error
(:mod:`service.grpc.status`). RPCs with no meaning here (shared memory, trace and log
settings) answer UNIMPLEMENTED, as the generated base class does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.auth import check_management, presented_key
from service.dataplane.plane import DataPlane, Inferred
from service.dataplane.tensors import DecodedRequest
from service.errors import BadRequest, ModelNotFound, ServiceError
from service.grpc.codec import decode_grpc_request, encode_grpc_response
from service.grpc.status import grpc_status
from service.models.served_version import ServedVersion
from service.protocol import PLATFORM, SERVER_EXTENSIONS
from service.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
GRPC_HOW = "metadata 'authorization: Bearer KEY'"


Method = TypeVar("Method", bound=Callable[..., Awaitable[Any]])


def rpc(method: Method) -> Method:
    """A unary RPC whose data plane errors end the call with their gRPC status (and
    message); any other exception is a bug: INTERNAL, logged with its traceback."""

    @functools.wraps(method)
    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except ServiceError as err:
            await context.abort(grpc_status(err), err.message)
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            log.error("unhandled error in %s", method.__name__, exc_info=err)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}")

    return call  # type: ignore[return-value]


class GrpcExchange:
    """A ``ModelInferRequest`` for the data plane (:class:`service.dataplane.plane.Exchange`)."""

    __slots__ = ("message", "timeout_us")

    def __init__(self, message: pb.ModelInferRequest, time_remaining: float | None) -> None:
        self.message = message
        self.timeout_us = None if time_remaining is None else max(1, int(time_remaining * 1e6))

    @property
    def receive(self) -> None:
        """None: a cancelled call cancels its task, which takes a queued request with it."""
        return None

    @property
    def time_limit_s(self) -> float | None:
        """The call's ``grpc-timeout``: what is left of it when the call reached the server."""
        return None if self.timeout_us is None else self.timeout_us / 1e6

    async def read(self, max_bytes: int) -> int:
        return int(self.message.ByteSize())  # received whole, within the message size limit

    def decode(self, served: ServedVersion) -> DecodedRequest:
        return decode_grpc_request(self.message, self.timeout_us)

    def encode(self, result: Inferred) -> pb.ModelInferResponse:
        served = result.served
        return encode_grpc_response(
            served.name, str(served.version), result.request.id or "", result.outputs
        )


def _version(given: str) -> str | None:
    return given or None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Triton's GRPCInferenceService, each RPC a thin transport over the data plane."""

    def __init__(self, dataplane: DataPlane, settings: Settings, version: str) -> None:
        self.dataplane = dataplane
        self.settings = settings
        self.version = version

    # -- health and metadata ------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.server_ready())

    @rpc
    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        found = self.dataplane.model_ready(request.name, _version(request.version))
        return pb.ModelReadyResponse(ready=found.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="foldserve", version=self.version, extensions=SERVER_EXTENSIONS
        )

    @rpc
    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        meta = self.dataplane.metadata(request.name, _version(request.version))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=PLATFORM,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    @rpc
    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        config = self.dataplane.config(request.name, _version(request.version))
        message = json_format.ParseDict(
            config, model_config_pb2.ModelConfig(), ignore_unknown_fields=True
        )
        return pb.ModelConfigResponse(config=message)

    @rpc
    async def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:
        name = request.name or None
        version = _version(request.version)
        if version is not None and name is None:
            raise BadRequest("a version needs a model name")
        stats = self.dataplane.statistics(name, version)
        return json_format.ParseDict(
            stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True
        )

    # -- inference ----------------------------------------------------------------------

    @rpc
    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        exchange = GrpcExchange(request, context.time_remaining())
        version = _version(request.model_version)
        return await self.dataplane.infer(request.model_name, version, exchange, "grpc")

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of a stream run concurrently (they batch together); each answer, or its
        error in ``error_message`` with the request's id, goes back as it is ready, and the
        stream stays open after an error."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def one(request: Any) -> None:
            exchange = GrpcExchange(request, None)
            version = _version(request.model_version)
            try:
                reply = await self.dataplane.infer(request.model_name, version, exchange, "grpc")
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=reply))
            except ServiceError as err:
                answers.put_nowait(_stream_error(request, err.message))
            except Exception as err:
                log.error("unhandled error in a gRPC stream request", exc_info=err)
                answers.put_nowait(_stream_error(request, f"internal error: {type(err).__name__}"))

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read_all())
        try:
            while (reply := await answers.get()) is not None:
                yield reply
            await reader  # its own error, if any, ends the call
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    # -- repository -----------------------------------------------------------------------

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        entries = self.dataplane.index(request.ready)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=e.name, version=e.version or "", state=e.state, reason=e.reason)
                for e in entries
            ]
        )

    @rpc
    async def RepositoryModelLoad(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        await self._manage(request.model_name, context, "load", sorted(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self._manage(request.model_name, context, "unload")
        return pb.RepositoryModelUnloadResponse()

    async def _manage(
        self, name: str, context: Any, action: str, parameters: list[str] | None = None
    ) -> None:
        metadata = dict(context.invocation_metadata() or ())
        presented = presented_key(metadata.get("authorization"), metadata.get("x-api-key"))
        check_management(self.settings, presented, "this RPC", GRPC_HOW)
        if parameters:  # Triton's config override, and files sent with the load
            raise BadRequest(
                f"load parameters {parameters} are not supported: a load serves what the "
                "repository directory holds (export a new version instead)"
            )
        if not name:
            raise ModelNotFound("model_name is empty: name the model to " + action)
        if action == "load":
            await self.dataplane.load(name)
        else:
            await self.dataplane.unload(name)


def _stream_error(request: Any, message: str) -> pb.ModelStreamInferResponse:
    reply = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    return pb.ModelStreamInferResponse(error_message=message, infer_response=reply)


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """``grpc.health.v1``: SERVING while the server is ready (every model loaded, not
    draining), for the server ("") and for the inference service."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def Check(self, request: Any, context: Any) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE_NAME):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        serving = self.dataplane.server_ready()
        status = health_pb2.HealthCheckResponse
        return status(status=status.SERVING if serving else status.NOT_SERVING)
