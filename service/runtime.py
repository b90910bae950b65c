"""ONNX Runtime sessions: provider choice, threads, IO binding, and a loaded model's run().

ONNX Runtime falls back to the CPU silently when the CUDA provider cannot
start, so the provider a session really uses is read back from
``session.get_providers()`` and that is what is logged and reported.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from service.metadata import ModelVersionError, TensorSpec, VersionMetadata, verified_bytes
from service.settings import IOBindingChoice, ProviderChoice

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
Variant = Literal["folded", "unfolded"]


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = count or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


class SessionFactory:
    """Creates sessions with the configured provider and thread count.

    With ``auto`` or ``cuda``, the first session that comes up on the CPU although
    CUDA was asked for settles the question: later sessions go straight to the
    CPU (one warning, not one per model).
    """

    def __init__(
        self, providers: ProviderChoice, threads: int, io_binding: IOBindingChoice
    ) -> None:
        self.requested = providers
        self.threads = threads if threads > 0 else usable_cpus()
        self.io_binding_choice = io_binding
        self._cuda_failed = providers == "cpu" or CUDA not in ort.get_available_providers()
        if providers == "cuda" and self._cuda_failed:
            log.warning("providers=cuda but this onnxruntime has no CUDA provider; using CPU")
        self._lock = threading.Lock()

    def provider_list(self) -> list[str]:
        return [CPU] if self._cuda_failed else [CUDA, CPU]

    def use_io_binding(self, provider: str) -> bool:
        """IO binding pays off when tensors cross to a device; ``on`` forces it (tests)."""
        if self.io_binding_choice == "auto":
            return provider == CUDA
        return self.io_binding_choice == "on"

    def create(self, model: bytes, *, optimized: bool = True) -> ort.InferenceSession:
        """A session for serialized ONNX ``model``; ``optimized=False``: no ORT graph passes."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Spinning worker threads would take the CPU from the event loop between requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if optimized
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        with self._lock:
            wanted = self.provider_list()
            session = ort.InferenceSession(model, sess_options=options, providers=wanted)
            used = session.get_providers()[0]
            if wanted[0] == CUDA and used != CUDA:
                self._cuda_failed = True
                level = logging.WARNING if self.requested == "cuda" else logging.INFO
                log.log(
                    level, "CUDA provider did not start (providers=%s); using CPU", self.requested
                )
        return session


class LoadedModel:
    """One served model version: its folded session (and the unfolded one on demand)."""

    def __init__(
        self,
        metadata: VersionMetadata,
        version_dir: Path,
        session: ort.InferenceSession,
        factory: SessionFactory,
    ) -> None:
        self.metadata = metadata
        self.name = version_dir.parent.name
        self.version = int(version_dir.name)
        self.version_dir = version_dir
        self.provider: str = session.get_providers()[0]
        self.io_binding = factory.use_io_binding(self.provider)
        self.threads = factory.threads
        self._device = "cuda" if self.provider == CUDA else "cpu"
        self._factory = factory
        self._sessions: dict[tuple[Variant, bool], ort.InferenceSession] = {
            ("folded", True): session
        }
        self._lock = threading.Lock()
        self.output_names = [spec.name for spec in metadata.outputs]
        self.input_specs = {spec.name: spec for spec in metadata.inputs}

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.metadata.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.metadata.outputs

    @property
    def labels(self) -> list[str]:
        return self.metadata.labels

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
                self._sessions[key] = self._factory.create(self._read(variant), optimized=optimized)
                log.info(
                    "%s v%d: created %s session (optimized=%s)",
                    self.name,
                    self.version,
                    variant,
                    optimized,
                )
            return self._sessions[key]

    def unfolded_session(self, *, optimized: bool = True) -> ort.InferenceSession:
        """The unfolded network (BatchNormalization nodes kept), loaded lazily."""
        return self.session("unfolded", optimized=optimized)

    def _read(self, variant: Variant) -> bytes:
        name = self.metadata.folded_file if variant == "folded" else self.metadata.unfolded_file
        if not name:
            raise ModelVersionError(f"metadata names no {variant} file")
        return verified_bytes(self.version_dir, name, self.metadata.sha256)

    def run(
        self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the folded model; ``feeds`` must already match the input specs."""
        names = output_names or self.output_names
        session = self._sessions[("folded", True)]
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

    def _run_bound(
        self, session: ort.InferenceSession, feeds: dict[str, np.ndarray], names: list[str]
    ) -> dict[str, np.ndarray]:
        # Outputs stay on the session's device until one copy back; inputs are bound in place.
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in names:
            binding.bind_output(name, self._device)
        session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))
