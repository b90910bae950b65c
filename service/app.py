"""create_app(settings): the FastAPI application with every part wired in.

The app's start-up (its lifespan) loads the repository before it ends, and
uvicorn listens only after it, so a worker takes no connection before every
model has been loaded (or skipped with its reason): no client is ever answered
"still loading" (``service.process.listeners``; the supervisor's health port
answers liveness meanwhile, ``service.process.supervisor``). With
``poll_interval`` > 0 the repository is then rescanned periodically (hot
reload without an explicit load call).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from service.dataplane.plane import DataPlane
from service.errors import install_error_handlers
from service.fold_latency import page, route
from service.fold_latency.lab import FoldLatencyLab
from service.grpc.server import start_grpc
from service.models.repository import ModelRepository
from service.models.served_version import ServingOptions
from service.observability.logs import flush_logs
from service.observability.metrics import ServiceMetrics, leave_multiprocess
from service.process.drain import Drain
from service.process.runtime_dir import RuntimeDir, open_runtime_dir
from service.process.supervisor import HealthPort, event_loop_liveness
from service.process.worker_sync import WorkerSync
from service.rest.connections import (
    GUARD_STATE_KEY,
    REASONS,
    ConnectionGuard,
    default_max_connections,
    describe,
)
from service.rest.middleware import RequestContextMiddleware
from service.rest.routes import docs, health, infer, models, repository
from service.rest.routes.models import server_version
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)


def build_repository(
    settings: Settings, metrics: ServiceMetrics, runtime: RuntimeDir | None = None
) -> ModelRepository:
    options = ServingOptions.from_settings(settings, metrics)
    return ModelRepository(settings.repository, options, runtime)


async def first_scan(repo: ModelRepository, sync: WorkerSync) -> None:
    """Load the repository once: this worker registered first, and applies the management
    decisions recorded so far before it turns ready."""
    sync.register()
    started = time.perf_counter()
    await asyncio.to_thread(repo.load_all, sync.catch_up)
    log.info("repository loaded in %.2f s: listening now", time.perf_counter() - started)
    freeze_startup_objects()


async def poll(repo: ModelRepository, interval: float) -> None:
    """Rescan the repository every ``interval`` seconds (0: never)."""
    while interval > 0:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(repo.refresh)
        except OSError as err:  # a repository on a flaky volume: try again next time
            log.warning("repository rescan failed: %s", err)


# Allocations between young collections (CPython's default: 700). Each request's objects die
# young; the ones that live on are those of the requests in progress or waiting in line
# (service.dataplane.admission), which the older generations' scans walk again and again: with
# thousands of clients in line, at 700 those scans took a tenth of a worker's time.
YOUNG_COLLECTION_THRESHOLD = 10_000


# The longest a worker waits at shutdown for its gRPC calls in flight (at least this, or the
# drain period when it is longer).
GRPC_GRACE_S = 5.0


def freeze_startup_objects() -> None:
    """Move every object alive once the models are loaded out of the collector's sight.

    Python's full (generation 2) collection walks every tracked object, and after
    start-up (FastAPI, pydantic, numpy, ONNX Runtime, the models) there are tens of
    thousands: tens of milliseconds a walk. Requests in flight survive the young
    collections and so keep triggering full ones under load, and each stalls the
    event loop: that was the p99 of small requests (docs/throughput.md has the
    measurements). Frozen objects are never scanned (nor collected: a
    version unloaded later frees what reference counting frees, as before).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD)
    log.info("froze %d start-up objects out of the collector's scans", gc.get_freeze_count())


def connection_guard(settings: Settings, metrics: ServiceMetrics) -> ConnectionGuard:
    """This worker's limits on what one client can hold (``service.rest.connections``)."""
    guard = ConnectionGuard(
        settings.header_timeout,
        settings.body_timeout,
        settings.max_connections or default_max_connections(),
        {reason: metrics.connections_closed.labels(reason) for reason in REASONS},
        metrics.open_connections,
    )
    log.info(describe(guard))
    return guard


def create_app(settings: Settings | None = None, repo: ModelRepository | None = None) -> FastAPI:
    """The service for ``settings`` (default: the environment); ``repo`` replaces the default."""
    settings = settings or get_settings()
    service_metrics = repo.options.metrics if repo is not None else ServiceMetrics()
    runtime = open_runtime_dir(settings.runtime_dir)
    repo = repo or build_repository(settings, service_metrics, runtime)
    sync = WorkerSync(runtime, repo)
    drain = Drain(settings.drain_seconds)
    guard = connection_guard(settings, service_metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        drain.install()
        tasks = [asyncio.create_task(sync.watch())]
        health = contextlib.ExitStack()  # a lone worker's liveness while it loads
        if settings.health_port:
            check = event_loop_liveness(asyncio.get_running_loop())
            health.enter_context(HealthPort(settings.host, settings.health_port, check))
        try:  # uvicorn listens when this start-up ends: every model is loaded by then
            await first_scan(repo, sync)
        except BaseException:
            tasks[0].cancel()
            health.close()
            raise
        tasks.append(asyncio.create_task(poll(repo, settings.poll_interval)))
        grpc_service = None
        if settings.grpc_port:  # created here: a grpc.aio server belongs to this event loop
            grpc_service = await start_grpc(app.state.dataplane, settings, server_version())
        yield {GUARD_STATE_KEY: guard}  # uvicorn hands it to every connection's protocol
        if grpc_service is not None:  # calls in flight finish, new ones get UNAVAILABLE
            await grpc_service.stop(max(settings.drain_seconds, GRPC_GRACE_S))
        sync.leave()
        leave_multiprocess()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)
        health.close()
        flush_logs()  # every request has been answered: its access line is written now

    app = FastAPI(
        title="FoldServe",
        version=server_version(),
        description="Folded BatchNorm models over the Open Inference Protocol (KServe V2).",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        # FoldServe reports through its own Prometheus metrics; FastAPI's OpenTelemetry hook
        # would otherwise look up the global providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.repository = repo
    app.state.metrics = service_metrics
    app.state.sync = sync
    app.state.drain = drain
    app.state.dataplane = DataPlane(repo, service_metrics, sync, drain, settings.max_request_bytes)
    app.state.fold_latency = FoldLatencyLab(runtime, settings.fold_latency_max_seconds)
    install_error_handlers(app)
    infer.install(app)  # before the request middleware, which must wrap its dispatch
    app.add_middleware(
        RequestContextMiddleware,
        max_request_bytes=settings.max_request_bytes,
        access_log=settings.access_log,
        drain=drain,
    )
    app.mount(docs.SWAGGER_STATIC, StaticFiles(directory=docs.SWAGGER_ASSETS), name="swagger-ui")
    for router in (health.router, models.router, repository.router, docs.router):
        app.include_router(router)
    app.include_router(route.router)
    app.include_router(page.router)
    return app
