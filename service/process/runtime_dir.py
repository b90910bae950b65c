"""The runtime directory: writable scratch space the worker processes of one server share.

Worker processes share no memory; whatever must be the same in all of them goes
through here (the model repository itself may be read-only):

```
<runtime>/control.json                 management decisions, numbered (service.process.worker_sync)
<runtime>/control.lock                 held while one is recorded
<runtime>/workers/<pid>.json           each worker's acknowledgement
<runtime>/metrics/                     prometheus-client's multiprocess files
<runtime>/derived/<sha256>/            folded twins of users' files, for a read-only repository
<runtime>/fold-latency.lock            held while a fold-latency measurement runs
<runtime>/fold-latency.progress.json   that measurement's progress
<runtime>/fold-latency/<model>.json    each model's last fold-latency report
```

:func:`open_runtime_dir` is the one place it is created: by the supervisor before
it starts the workers (which then open the same path), or by a single-process app.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# prometheus-client's multiprocess mode: the directory each worker writes its values into
# (prometheus-client reads it when imported; service.observability.metrics reads it too).
PROMETHEUS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class RuntimeDir:
    """The paths of one runtime directory (:func:`open_runtime_dir` creates it)."""

    root: Path

    @property
    def control(self) -> Path:
        return self.root / "control.json"

    @property
    def control_lock(self) -> Path:
        return self.root / "control.lock"

    @property
    def workers(self) -> Path:
        return self.root / "workers"

    def worker(self, pid: int) -> Path:
        """Where worker ``pid`` acknowledges what it applied."""
        return self.workers / f"{pid}.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def start_metrics(self) -> None:
        """Before any worker starts: an empty metrics directory, named to the workers by
        ``PROMETHEUS_MULTIPROC_DIR`` in the environment they inherit."""
        shutil.rmtree(self.metrics, ignore_errors=True)
        self.metrics.mkdir(parents=True)
        os.environ[PROMETHEUS_DIR_ENV] = str(self.metrics)

    @property
    def derived(self) -> Path:
        return self.root / "derived"

    @property
    def latency_lock(self) -> Path:
        return self.root / "fold-latency.lock"

    @property
    def latency_progress(self) -> Path:
        return self.root / "fold-latency.progress.json"

    @property
    def latency_reports(self) -> Path:
        return self.root / "fold-latency"

    def latency_report(self, model: str) -> Path:
        """Model ``model``'s last fold-latency report."""
        return self.latency_reports / f"{model}.json"


def open_runtime_dir(configured: Path | None) -> RuntimeDir:
    """``configured`` (created if missing; shared by the workers of one server), else a
    fresh temporary directory; with the subdirectories every worker writes into. Safe to
    call from several processes at once. OSError when it cannot be created."""
    root = configured or Path(tempfile.mkdtemp(prefix="foldserve-runtime-"))
    runtime = RuntimeDir(root)
    for directory in (root, runtime.workers, runtime.latency_reports):
        directory.mkdir(parents=True, exist_ok=True)
    return runtime
