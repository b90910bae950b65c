"""The data plane: what every transport (REST, gRPC) asks of the server, in one place.

A transport decodes its wire form, calls the data plane, encodes the answer and
maps the data plane's errors (:mod:`service.errors`, each with its HTTP status;
:mod:`service.grpc.status` maps them to gRPC codes). The data plane owns model
resolution, admission (:mod:`service.dataplane.admission`), request validation
(:mod:`service.dataplane.validation`), the hand-off to a version's batcher, classification,
metrics and statistics, and repository management through the workers' shared
record (:mod:`service.process.worker_sync`). KServe's ``protocol/dataplane.py`` and
MLServer's ``handlers/dataplane.py`` split their servers the same way.

An inference request reaches it as an :class:`Exchange`: the transport's way to
read the payload (at the client's pace, after the cheap overload refusal) and to
decode and encode it. Small payloads are decoded and encoded on the event loop,
large ones in a worker thread (``INLINE_*`` below).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from foldserve.datatypes import V2_DATATYPES
from foldserve.onnx_fold.version import derived_from
from service.dataplane.admission import AdmissionGate, AdmissionGates
from service.dataplane.classification import classify
from service.dataplane.tensors import DecodedRequest, OutputTensor
from service.dataplane.validation import prepare_feeds, select_outputs
from service.errors import DeadlineUnreachable, LoadFailed, QueueFull, RequestTimeout
from service.models.batcher import DynamicBatcher, Receive
from service.models.repository import NOT_SELECTED, ModelEntry, ModelRepository
from service.models.served_version import ServedVersion
from service.models.triton_config import triton_model_config
from service.observability.metrics import RequestRecord, ServiceMetrics
from service.observability.statistics import model_statistics
from service.process.drain import Drain
from service.process.worker_sync import WorkerSync
from service.protocol import (
    PLATFORM,
    FoldReportSummary,
    LoadResult,
    ModelMetadata,
    ModelReady,
    RepositoryEntry,
    TensorMetadata,
)

Answer = TypeVar("Answer", covariant=True)

# Bodies (bytes) and outputs (elements) up to these sizes are handled on the event loop.
INLINE_BODY_BYTES = 64 * 1024
INLINE_OUTPUT_ELEMENTS = 16 * 1024


def output_elements(outputs: list[OutputTensor]) -> int:
    total = 0
    for tensor in outputs:
        total += tensor.array.size
    return total


class Exchange(Protocol[Answer]):
    """One inference request as a transport hands it over."""

    @property
    def receive(self) -> Receive | None:
        """REST: the request's ASGI receive, so that a client that leaves is noticed."""

    @property
    def time_limit_s(self) -> float | None:
        """Seconds the client allows, known before the payload is read (gRPC's deadline)."""

    async def read(self, max_bytes: int) -> int:
        """Read the payload (REST: the body, at the client's pace); its size in bytes."""

    def decode(self, served: ServedVersion) -> DecodedRequest:
        """The payload as a request for ``served``; raises :class:`BadRequest`."""

    def encode(self, result: Inferred) -> Answer:
        """The answer in the transport's form."""


@dataclass(slots=True)
class Inferred:
    """A request's result: the version that ran it, the request and its outputs."""

    served: ServedVersion
    request: DecodedRequest
    outputs: list[OutputTensor]


T = TypeVar("T")


class DataPlane:
    """One worker's data plane over its repository, metrics, entry gates and worker record."""

    def __init__(
        self,
        repository: ModelRepository,
        metrics: ServiceMetrics,
        sync: WorkerSync,
        drain: Drain,
        max_request_bytes: int,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.sync = sync
        self.drain = drain
        self.max_request_bytes = max_request_bytes
        self.admission = AdmissionGates(metrics.admission_waiting, metrics.pending_requests)

    # -- health -----------------------------------------------------------------------

    def server_ready(self) -> bool:
        """Every model loaded (or skipped with its reason) and not draining."""
        return self.repository.ready and not self.drain.draining

    # -- models -----------------------------------------------------------------------

    def metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        model = self.repository.get(name, version)
        entry = self.repository.entry(name)
        meta = model.metadata
        return ModelMetadata(
            name=name,
            versions=[str(v) for v in entry.ready_versions()],
            platform=PLATFORM,
            inputs=[
                TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape))
                for s in model.inputs
            ],
            outputs=[
                TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape))
                for s in model.outputs
            ],
            version=str(model.version),
            provider=model.provider,
            variant=model.variant,
            io_binding=model.io_binding,
            bn_nodes=meta.bn_nodes,
            fold_report=FoldReportSummary(
                folded=len(meta.fold_report.folded),
                kept=meta.fold_report.kept,
            ),
            labels=model.labels,
            derived_from=derived_from(meta),
            features=meta.features,
        )

    def model_ready(self, name: str, version: str | None = None) -> ModelReady:
        """Whether the model (version) can serve, and why not. Raises :class:`ModelNotFound`
        for an unknown one and :class:`ModelNotReady` while the repository loads."""
        entry, status = self.repository.resolve(name, version)
        if status is not None and status.model is not None:
            return ModelReady(name=name, version=str(status.version), ready=True)
        reason = status.reason if status is not None else entry.why_not_ready()
        return ModelReady(name=name, version=version, ready=False, reason=reason)

    def config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model configuration (JSON form) of the version a request would get."""
        served = self.repository.get(name, version)
        return triton_model_config(served, self.repository.entry(name).config.policy)

    def statistics(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Triton's statistics of every ready version of ``name`` (or of every model), or of
        ``version``: sums over all workers."""
        if version is not None:
            assert name is not None
            self.repository.resolve(name, version)  # ModelNotFound for an unknown one
            keys = [(name, str(int(version)))]
        else:
            entries = (
                [self.repository.entry(name)] if name is not None else self.repository.entries()
            )
            keys = [(e.name, str(v)) for e in entries for v in e.ready_versions()]
        return model_statistics(self.metrics.collect_registry(), keys)

    # -- repository -------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        """Every model version, its state (READY or UNAVAILABLE) and why."""
        entries = [e for entry in self.repository.entries() for e in index_entries(entry)]
        return [e for e in entries if e.state == "READY"] if ready_only else entries

    async def load(self, name: str) -> LoadResult:
        """Rescan the model's directory in every worker; :class:`LoadFailed` when a version
        failed validation or none is ready (versions that served keep serving)."""
        entry, states = await self.sync.change(name, "load")
        versions = index_entries(entry)
        failures = _failures(entry)
        if failures or entry.default() is None:
            raise LoadFailed(
                f"model '{name}' did not load cleanly: "
                + "; ".join(failures or ["no ready version"]),
                details={"name": name, "versions": [v.model_dump() for v in versions]},
            )
        return LoadResult(name=name, versions=versions, workers=len(states))

    async def unload(self, name: str) -> LoadResult:
        """Stop serving every version of the model, in every worker, until it is loaded."""
        entry, states = await self.sync.change(name, "unload")
        return LoadResult(name=name, versions=index_entries(entry), workers=len(states))

    # -- inference --------------------------------------------------------------------

    async def infer(
        self, name: str, version: str | None, exchange: Exchange[T], protocol: str
    ) -> T:
        """One inference request, from resolution to its encoded answer.

        Unknown or unavailable models are refused before anything is read; then the
        entry's cheap refusals: overload, and a deadline the work ahead would carry it
        past; then the payload is read and the request waits for its turn
        (:mod:`service.dataplane.admission`), is decoded, checked, batched, run and
        encoded. Raises the :mod:`service.errors` of each step.

        The request's deadline is its arrival plus the smallest of the model's latency
        target, the server's request timeout, the gRPC call's deadline and the request's
        own ``parameters.timeout`` (read with the payload).
        """
        repository = self.repository
        with self.metrics.track_request(repository.metric_label(name), protocol) as record:
            served = repository.get(name, version)
            record.version = str(served.version)
            gate = self.admission(name)  # known models only: resolved just above
            self.admission.arrived()
            arrived = time.perf_counter()
            batcher = served.batcher
            config = batcher.config
            limits = (config.latency_target_s, served.default_timeout_s, exchange.time_limit_s)
            budget = min((s for s in limits if s is not None), default=None)
            deadline = None if budget is None else arrived + budget
            try:
                gate.check_room(config.max_queue_size)  # refused before the payload is read
                if budget is not None:
                    _check_reachable(batcher, gate, budget)
                size = await exchange.read(self.max_request_bytes)
                read = time.perf_counter()
                wait = None if deadline is None else deadline - read
                await gate.enter(config.admission_limit, config.max_queue_size, wait)
                record.admission_s = time.perf_counter() - read
            except (QueueFull, DeadlineUnreachable) as refused:
                reason = "queue_full" if isinstance(refused, QueueFull) else "rejected"
                batcher.metrics.dropped[reason].inc()
                hold = gate.refusal_hold_s()
                if hold:  # a storm of clients that send again at once: paced
                    await asyncio.sleep(hold)
                raise
            except RequestTimeout:  # in line past its deadline
                batcher.metrics.dropped["expired"].inc()
                raise
            except asyncio.CancelledError:  # the client cancelled while it waited in line
                batcher.metrics.dropped["cancelled"].inc()
                raise
            try:
                if served.batcher.closed:  # swapped out or unloaded while it waited in line
                    served = repository.get(name, version)
                    record.version = str(served.version)
                return await self._admitted(exchange, served, size, record, arrived, deadline)
            finally:
                gate.leave()

    async def _admitted(
        self,
        exchange: Exchange[T],
        served: ServedVersion,
        size: int,
        record: RequestRecord,
        arrived: float,
        deadline: float | None,
    ) -> T:
        start = time.perf_counter()
        if size > INLINE_BODY_BYTES:  # a thread hop costs more than a small decode
            request = await asyncio.to_thread(exchange.decode, served)
        else:
            request = exchange.decode(served)
        record.input_s = time.perf_counter() - start
        if request.timeout_us:  # the request's own timeout, from its arrival
            own = arrived + request.timeout_us / 1e6
            deadline = own if deadline is None else min(deadline, own)
        outputs = await self.run(served, request, exchange.receive, deadline, record)
        start = time.perf_counter()
        result = Inferred(served, request, outputs)
        if output_elements(outputs) > INLINE_OUTPUT_ELEMENTS:
            answer = await asyncio.to_thread(exchange.encode, result)
        else:
            answer = exchange.encode(result)
        record.output_s += time.perf_counter() - start
        return answer

    async def run(
        self,
        served: ServedVersion,
        request: DecodedRequest,
        receive: Receive | None = None,
        deadline: float | None = None,
        record: RequestRecord | None = None,
    ) -> list[OutputTensor]:
        """The outputs ``request`` asks for (all when it names none), checked and batched.

        ``receive`` lets a client that disconnects take its queued request with it;
        ``deadline`` (a ``time.perf_counter()`` time) is when it must be dispatched by;
        ``record`` gets the time spent checking (input) and in its batch.
        """
        start = time.perf_counter()
        feeds = prepare_feeds(served.name, served.input_specs, served.inputs, request.inputs)
        wanted = select_outputs(
            served.name, served.output_names, request.outputs, served.every_output
        )
        if record is not None:
            record.input_s += time.perf_counter() - start
        results = await served.batcher.run(
            feeds, [w.name for w in wanted], deadline=deadline, receive=receive, record=record
        )
        start = time.perf_counter()
        outputs = []
        for w in wanted:
            binary = request.binary_output if w.binary is None else w.binary
            array = results[w.name]
            if w.classification:
                top = classify(array, w.classification, served.labels)
                outputs.append(OutputTensor(w.name, "BYTES", top, binary))
            else:
                outputs.append(OutputTensor(w.name, V2_DATATYPES[array.dtype], array, binary))
        if record is not None:
            record.output_s += time.perf_counter() - start
        return outputs


def _check_reachable(batcher: DynamicBatcher, gate: AdmissionGate, budget: float) -> None:
    """Raise :class:`DeadlineUnreachable` when the requests already in progress or in line
    would carry a new one past its ``budget`` seconds: the batches they need at the run
    time measured, or the entry's measured pace per request, whichever is slower. With
    nothing ahead it goes on: queueing is not what would make it late, and a target below
    the model's own run time is served late rather than never."""
    ahead = gate.admitted + gate.waiting
    if not ahead:
        return
    batches = batcher.predicted_wait(ahead)
    pace = gate.pace_s()
    paced = None if pace is None else (ahead + 1) * pace
    known = [s for s in (batches, paced) if s is not None]
    expected = max(known) if known else None
    if expected is not None and expected > budget:
        raise DeadlineUnreachable(
            f"{batcher.label} cannot answer within {budget * 1e3:.4g} ms: {ahead} requests "
            f"ahead in this worker need about {expected * 1e3:.4g} ms; retry later",
            headers={"Retry-After": "1"},
        )


def index_entries(entry: ModelEntry) -> list[RepositoryEntry]:
    if not entry.versions:
        return [RepositoryEntry(name=entry.name, state="UNAVAILABLE", reason=entry.why_not_ready())]
    return [
        RepositoryEntry(name=entry.name, version=str(v), state=s.state, reason=s.reason)
        for v, s in sorted(entry.versions.items())
    ]


def _failures(entry: ModelEntry) -> list[str]:
    """Why versions of ``entry`` cannot serve (or cannot serve the variant its config.json
    asks for: a READY version with a reason), where that is a failure (not a policy)."""
    if not entry.versions:
        return [entry.why_not_ready()]
    return [
        f"version {v}: {s.reason}"
        for v, s in sorted(entry.versions.items())
        if s.reason and not s.reason.startswith(NOT_SELECTED)
    ]
