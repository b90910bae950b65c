"""The gRPC floor: a bare ``grpc.aio`` server whose ModelInfer answers one constant response.

    python bench/peers/grpc_floor.py --port 8001 [--workers 2] [--loop asyncio] [--hop]

It implements Triton's ``inference.GRPCInferenceService`` (the stubs that
``tritonclient.grpc`` ships) with ``ModelInfer`` answering one prebuilt
``ModelInferResponse`` (one FP32 output "logits" of shape [1, 10], as the
digits model answers one sample), plus ``ServerLive``/``ServerReady``. grpcio
still parses every request and serializes the answer, and runs no model: what a
Python gRPC server costs per call before it does anything. ``--workers`` server
processes listen on one port (SO_REUSEPORT, grpcio's default on Linux), each
started with multiprocessing's spawn method and creating its server inside its
own event loop (grpc.aio servers cannot cross a fork). The loop is uvloop, as in
FoldServe's workers (uvicorn's), unless ``--loop asyncio``: grpc.aio answered
1.2x as many calls on uvloop as on asyncio's own loop here (digits_cnn batch 1,
64 calls in flight, 2 workers). With ``--hop`` each call first awaits a no-op run
in a thread, the round trip a call makes when a batcher's thread runs its model:
what that costs under grpc.aio.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import queue
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.queues import Queue
from types import FrameType

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

log = logging.getLogger("grpc_floor")

# Large tensors (resnet_bench at batch 32 is 384 KiB) pass; grpcio's default is 4 MiB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def constant_answer() -> service_pb2.ModelInferResponse:
    output = service_pb2.ModelInferResponse.InferOutputTensor(
        name="logits", datatype="FP32", shape=[1, 10]
    )
    return service_pb2.ModelInferResponse(
        model_name="floor",
        model_version="1",
        outputs=[output],
        raw_output_contents=[bytes(4 * 10)],
    )


@dataclass(frozen=True)
class FloorOptions:
    host: str
    port: int
    loop: str  # "uvloop" or "asyncio"
    hop: bool  # each call awaits a no-op in a thread first, as a call handed to a batcher does


class FloorServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, hop: bool) -> None:
        self.answer = constant_answer()
        self.pool = ThreadPoolExecutor(1) if hop else None

    async def ServerLive(  # noqa: N802 (the proto's method names)
        self, request: service_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(  # noqa: N802
        self, request: service_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelInfer(  # noqa: N802
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        if self.pool is not None:
            await asyncio.get_running_loop().run_in_executor(self.pool, int)
        return self.answer


async def serve(options: FloorOptions, bound: Queue[int]) -> None:
    """One worker: its own server, created in this process's running loop."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(FloorServicer(options.hop), server)
    address = f"{options.host}:{options.port}"
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"grpc_floor: cannot bind {address}")
    await server.start()
    bound.put(options.port)
    await server.wait_for_termination()


def worker(options: FloorOptions, bound: Queue[int]) -> None:
    if options.loop == "uvloop":
        import uvloop

        uvloop.run(serve(options, bound))
    else:
        asyncio.run(serve(options, bound))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    parser.add_argument(
        "--hop", action="store_true", help="each call first awaits a no-op in a thread"
    )
    args = parser.parse_args()
    options = FloorOptions(args.host, args.port, args.loop, args.hop)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    # SIGTERM unwinds through the finally below, so no worker outlives this process.
    signal.signal(signal.SIGTERM, terminate)
    spawn = multiprocessing.get_context("spawn")
    bound: Queue[int] = spawn.Queue()
    workers = [
        spawn.Process(target=worker, args=(options, bound), daemon=True)
        for _ in range(args.workers)
    ]
    try:
        for process in workers:
            process.start()
        ready = 0
        while ready < len(workers):  # every worker bound, or one died trying
            try:
                bound.get(timeout=1.0)
                ready += 1
            except queue.Empty:
                if any(p.exitcode is not None for p in workers):
                    sys.exit("grpc_floor: a worker exited before it served")
        log.info("serving on %s:%d with %d worker(s)", args.host, args.port, args.workers)
        for process in workers:
            process.join()
            if process.exitcode:
                sys.exit(f"grpc_floor: a worker exited with {process.exitcode}")
    finally:
        for process in workers:
            if process.is_alive():
                process.terminate()
        for process in workers:
            process.join()


if __name__ == "__main__":
    main()
