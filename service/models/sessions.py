"""ONNX Runtime sessions: provider choice, threads, IO binding.

ONNX Runtime falls back to the CPU silently when the CUDA provider cannot
start, so the provider a session really uses is read back from
``session.get_providers()`` and that is what is logged and reported.
"""

from __future__ import annotations

import logging
import threading

import onnxruntime as ort

from service.process.machine import usable_cpus
from service.settings import IOBindingChoice, ProviderChoice

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_ORT_SEVERITY = 2  # ONNX Runtime's default logger: warnings and above


def session_options(threads: int, *, optimized: bool = True) -> ort.SessionOptions:
    """The options of every session the service runs: ``threads`` intra-op threads that do
    not spin, one inter-op thread; ``optimized=False``: no ONNX Runtime graph passes."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning worker threads would take the CPU from the event loop between requests.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return options


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
        self._cuda_started = False  # a session has run on CUDA: no more probing
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
        options = session_options(self.threads, optimized=optimized)
        with self._lock:
            wanted = self.provider_list()
            probing = wanted[0] == CUDA and not self._cuda_started
            if probing:  # a machine without CUDA libraries: no red ERROR line from ORT itself
                ort.set_default_logger_severity(4)
            try:
                session = ort.InferenceSession(model, sess_options=options, providers=wanted)
            finally:
                if probing:
                    ort.set_default_logger_severity(DEFAULT_ORT_SEVERITY)
            used = session.get_providers()[0]
            if wanted[0] == CUDA and used != CUDA:
                self._cuda_failed = True
                level = logging.WARNING if self.requested == "cuda" else logging.INFO
                log.log(
                    level,
                    "CUDA provider did not start (providers=%s: no usable GPU or CUDA "
                    "libraries); serving on the CPU",
                    self.requested,
                )
            elif used == CUDA:
                self._cuda_started = True
        return session
