"""FoldLatencyLab: what the fold-latency route needs around one measurement.

One measurement at a time in the whole server (a file lock in the runtime
directory, shared by the worker processes), in a worker thread of its own;
its progress and the last report of each model kept there too, for every
worker to read (:mod:`service.fold_latency.measure` measures).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import anyio

from foldserve.files import file_lock, write_atomic
from foldserve.model_format import ModelVersionError
from service.errors import MeasurementBusy, NoReportYet, NotMeasurable
from service.fold_latency.measure import LatencyParams, Progress, measure_model
from service.fold_latency.report import FoldLatencyReport
from service.models.served_version import ServedVersion
from service.process.runtime_dir import RuntimeDir


class FoldLatencyLab:
    """Runs measurements for the HTTP route: one at a time in the whole server (a file lock
    in the runtime directory, shared by the worker processes), in a worker thread of its
    own; the last report of each model is kept there too, for every worker to return."""

    def __init__(self, runtime: RuntimeDir, max_seconds: float = 60.0) -> None:
        self.max_seconds = max_seconds
        self._runtime = runtime
        self._lock_path = runtime.latency_lock
        self._progress_path = runtime.latency_progress
        # A limiter of its own: a measurement never takes a thread token from inference.
        self._limiter = anyio.CapacityLimiter(1)

    def last(self, name: str) -> FoldLatencyReport:
        """The last report of model ``name`` (with samples), measured by any worker;
        :class:`NoReportYet` when there is none."""
        try:
            found = FoldLatencyReport.model_validate_json(
                self._runtime.latency_report(name).read_bytes()
            )
        except FileNotFoundError:
            raise NoReportYet(
                f"no fold-latency report for model '{name}' yet: "
                f"GET /v2/models/{name}/fold-latency (without cached=true) measures one"
            ) from None
        return found

    async def measure(self, model: ServedVersion, params: LatencyParams) -> FoldLatencyReport:
        """Measure ``model`` off the event loop; :class:`MeasurementBusy` (429) while another
        measurement runs in any worker, with a Retry-After guessed from its pace."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(file_lock(self._lock_path, wait=False))
            except BlockingIOError:
                progress = Progress.read(self._progress_path)
                wait = progress.seconds_left(self.max_seconds) if progress else 1.0
                raise MeasurementBusy(
                    "a fold-latency measurement is already running (one at a time); retry later",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                ) from None
            try:
                progress = Progress(self._progress_path)
                bounded = replace(params, max_seconds=min(params.max_seconds, self.max_seconds))
                report = await anyio.to_thread.run_sync(
                    measure_model, model, bounded, progress, limiter=self._limiter
                )
            except ModelVersionError as err:
                raise NotMeasurable(
                    f"model '{model.name}' version {model.version} cannot be measured: {err}"
                ) from err
        write_atomic(self._runtime.latency_report(model.name), report.model_dump_json().encode())
        return report
