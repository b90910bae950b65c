"""The CPUs this process may use, and facts about the machine a measurement ran on (CPU,
GPU, load) for reports. Light to import: the server's supervisor needs the CPU count, and
no more (ONNX Runtime is imported where the facts are gathered)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any


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


@functools.lru_cache(maxsize=4)
def _static_machine_facts(cuda: bool) -> dict[str, Any]:
    import onnxruntime as ort

    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "cpu": _cpu_name(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "gpu": None,
    }
    if cuda:
        facts["gpu"] = _gpu_name()
    return facts


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out.splitlines()[0] if out else "unknown CUDA device"


def machine_facts(provider: str) -> dict[str, Any]:
    """CPU count, CPU and GPU names (GPU with the CUDA provider), load average now."""
    from service.models.sessions import CUDA

    facts = dict(_static_machine_facts(provider == CUDA))
    facts["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return facts
