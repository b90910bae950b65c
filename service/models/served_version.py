"""ServedVersion: one READY model version and what it owns, from load to close.

The repository creates a :class:`ServedVersion` when a version passes its
checks and closes it when the version is swapped out or unloaded. It owns the
version's ONNX Runtime sessions (the served one: folded, or INT8 when the model's
``config.json`` asks; the others and the unoptimized ones on demand), its batching
configuration and dynamic batcher, and the specs that requests are checked against;
the data plane (:mod:`service.dataplane.plane`) runs requests through it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from foldserve.model_format import (
    ModelVersionError,
    TensorData,
    TensorSpec,
    Variant,
    VersionMetadata,
    verified_bytes,
)
from service.dataplane.tensors import RequestedOutput
from service.models.batch_call import Feeds, Outputs
from service.models.batcher import DynamicBatcher
from service.models.config import BatchingConfig, BatchingOverrides
from service.models.sessions import CUDA, SessionFactory
from service.observability.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingOptions:
    """What every served version runs with: the session factory, the server's batching
    settings (a model's ``config.json`` goes over them), metrics and the default timeout."""

    factory: SessionFactory
    batching: BatchingConfig
    metrics: ServiceMetrics
    timeout_s: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings, metrics: ServiceMetrics) -> ServingOptions:
        return cls(
            SessionFactory(settings.providers, settings.threads, settings.io_binding),
            BatchingConfig.from_settings(settings),
            metrics,
            settings.request_timeout_ms / 1e3 or None,
        )


def variant_bytes(
    metadata: VersionMetadata, version_dir: Path, variant: Variant, folded_dir: Path | None = None
) -> bytes:
    """A version's file of ``variant``, verified against the metadata's sha256; the folded
    file lives in ``folded_dir`` when given (a bare model.onnx's derived cache).

    Raises :class:`ModelVersionError` when the version has no such file or it changed.
    """
    files = metadata.files
    name = {"folded": files.folded, "unfolded": files.unfolded, "int8": files.int8}[variant]
    if variant == "int8" and (not name or metadata.int8 is None):
        raise ModelVersionError(
            "this version has no model.int8.onnx (export it with `python -m training export "
            "--int8`)"
        )
    if not name:
        raise ModelVersionError(f"metadata names no {variant} file")
    where = (folded_dir or version_dir) if variant == "folded" else version_dir
    return verified_bytes(where, name, metadata.sha256)


class ServedVersion:
    """One served model version: its sessions, batcher and specs."""

    def __init__(
        self,
        metadata: VersionMetadata,
        version_dir: Path,
        session: ort.InferenceSession,
        options: ServingOptions,
        batching: BatchingOverrides,
        folded_dir: Path | None = None,
        variant: Variant = "folded",
    ) -> None:
        self.metadata = metadata
        self.variant: Variant = variant  # the file ``session`` runs: model.onnx or int8
        self.name = version_dir.parent.name
        self.version = int(version_dir.name)
        self.version_dir = version_dir
        # Where the folded file lives: the version directory, or a bare model.onnx's cache.
        self.folded_dir = folded_dir or version_dir
        self.provider: str = session.get_providers()[0]
        self.io_binding = options.factory.use_io_binding(self.provider)
        self.threads = options.factory.threads
        self.inputs: list[TensorSpec] = metadata.inputs
        self.outputs: list[TensorSpec] = metadata.outputs
        self.labels: list[str] = metadata.labels
        self.output_names = [spec.name for spec in metadata.outputs]
        self.input_specs = {spec.name: spec for spec in metadata.inputs}
        # What a request that names no outputs gets (read-only, shared by those requests).
        self.every_output = [RequestedOutput(n, None, 0) for n in self.output_names]
        self._device = "cuda" if self.provider == CUDA else "cpu"
        self._options = options
        self._serving = session
        self._sessions: dict[tuple[Variant, bool], ort.InferenceSession] = {
            (variant, True): session
        }
        self._lock = threading.Lock()
        version = str(self.version)
        self.batcher = DynamicBatcher(
            f"model '{self.name}' version {version}",
            self.run,
            all(spec.shape[:1] == (-1,) for spec in (*self.inputs, *self.outputs)),
            options.batching.merged(batching),
            options.metrics.batcher(self.name, version),
        )

    def configure(self, batching: BatchingOverrides) -> None:
        """Apply a model's (new) ``config.json`` batching settings."""
        self.batcher.config = self._options.batching.merged(batching)

    def close(self) -> None:
        """Swapped out or unloaded: refuse new requests, finish the queued ones."""
        self.batcher.close()
        log.info("model %s version %d closed", self.name, self.version)

    @property
    def default_timeout_s(self) -> float | None:
        """The server's request timeout (None: none); a request's own goes over it."""
        return self._options.timeout_s

    # -- ONNX Runtime -----------------------------------------------------------------

    def session(
        self, variant: Variant = "folded", *, optimized: bool = True
    ) -> ort.InferenceSession:
        """The session for a variant, created on first use with the same provider and threads.

        Raises :class:`ModelVersionError` when the variant's file is missing or
        its sha256 disagrees with ``metadata.json``.
        """
        key = (variant, optimized)
        with self._lock:
            if key not in self._sessions:
                data = self.file_bytes(variant)
                self._sessions[key] = self._options.factory.create(data, optimized=optimized)
                log.info(
                    "%s v%d: created %s session (optimized=%s)",
                    self.name,
                    self.version,
                    variant,
                    optimized,
                )
            return self._sessions[key]

    def file_bytes(self, variant: Variant) -> bytes:
        """The variant's ONNX file, verified against the metadata's sha256."""
        return variant_bytes(self.metadata, self.version_dir, variant, self.folded_dir)

    def reference_outputs(self) -> tuple[dict[str, TensorData], float]:
        """The outputs the served file must give on the reference inputs, and their atol:
        the INT8 file's own recorded outputs when it serves, else the folded model's."""
        int8 = self.metadata.int8
        if self.variant == "int8" and int8 is not None:
            return int8.reference_outputs, int8.reference_atol
        return self.metadata.reference.outputs, self.metadata.reference.atol

    def run(self, feeds: Feeds, output_names: list[str] | None = None) -> Outputs:
        """Run the served file once (a worker thread); ``feeds`` must match the specs."""
        names = output_names or self.output_names
        session = self._serving
        if self.io_binding:
            try:
                return self._run_bound(session, feeds, names)
            except InvalidArgument:
                raise  # the inputs are wrong, not the binding
            except Exception as err:  # a provider that cannot bind: plain runs from now on
                log.warning(
                    "%s v%d: IO binding failed (%s); falling back to plain runs",
                    self.name,
                    self.version,
                    err,
                )
                self.io_binding = False
        results: list[Any] = session.run(names, feeds)
        return dict(zip(names, results, strict=True))

    def _run_bound(self, session: ort.InferenceSession, feeds: Feeds, names: list[str]) -> Outputs:
        # Outputs stay on the session's device until one copy back; inputs are bound in place.
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in names:
            binding.bind_output(name, self._device)
        session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))
