"""WorkerSync: every worker process applies the same repository management, and says so.

Worker processes share no memory. A load or unload is applied by the worker
that received it and recorded as a numbered generation in
``<runtime>/control.json`` (written atomically, under a file lock). Every worker
watches that file, applies what changed to its own repository, and
acknowledges in ``<runtime>/workers/<pid>.json``: the generation it has applied
and the versions it serves. The management call answers once every live
worker has acknowledged its generation with the same versions as its own, or,
past ``timeout_s``, with an error naming the workers that lag or disagree.

A worker registers before its first scan and applies the recorded state after
it, so a restarted worker honours earlier unloads, and a call made while a
worker is still starting waits for it. The runtime directory is writable
scratch space: the model repository itself may be read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from foldserve.files import file_lock, write_atomic
from service.errors import ModelNotReady, ServiceError, WorkersOutOfStep
from service.models.repository import ModelEntry, ModelRepository
from service.process.runtime_dir import RuntimeDir

log = logging.getLogger(__name__)

Action = Literal["load", "unload"]
# (version, state, variant served: "" when none) of one model, as a worker has it
Served = list[tuple[int, str, str]]


@dataclass(frozen=True)
class WorkerState:
    """What one worker last acknowledged."""

    pid: int
    generation: int  # -1: registered, still starting
    models: dict[str, Served]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def served(entry: ModelEntry | None) -> Served:
    if entry is None:
        return []
    return sorted(
        (v, s.state, s.model.variant if s.model is not None else "")
        for v, s in entry.versions.items()
    )


class WorkerSync:
    """This worker's side of the shared management record (see the module docstring)."""

    def __init__(
        self,
        runtime: RuntimeDir,
        repository: ModelRepository,
        *,
        timeout_s: float = 30.0,
        poll_s: float = 0.05,
    ) -> None:
        self.runtime = runtime
        self.repository = repository
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.pid = os.getpid()
        self.applied = -1  # the generation this worker has applied
        self._control_stamp: tuple[int, int] | None = None
        self._apply_lock = threading.Lock()
        self._ack_path = runtime.worker(self.pid)

    # -- this worker ----------------------------------------------------------------

    def register(self) -> None:
        """Before the first scan: management calls wait for this worker from now on."""
        self._write_ack(-1)

    def catch_up(self) -> None:
        """Apply every recorded decision not applied yet, then acknowledge (blocking)."""
        with self._apply_lock:
            record = self._read_control()
            self._apply(record)
            self._write_ack(self.applied)

    def leave(self) -> None:
        """This worker exits: management calls stop waiting for it."""
        with contextlib.suppress(OSError):
            self._ack_path.unlink()

    async def watch(self) -> None:
        """Apply decisions made by other workers as they are recorded (runs until cancelled)."""
        path = self.runtime.control
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            stamp = (st.st_mtime_ns, st.st_ino)
            if stamp != self._control_stamp:
                self._control_stamp = stamp
                await asyncio.to_thread(self.catch_up)

    # -- a management call --------------------------------------------------------------

    async def change(self, name: str, action: Action) -> tuple[ModelEntry, list[WorkerState]]:
        """Apply ``action`` to model ``name`` here, record it, and wait until every live
        worker serves the same versions; the entry here and every worker's state.

        Raises :class:`ModelNotFound` for an unknown model, :class:`WorkersOutOfStep`
        when a worker has not caught up within ``timeout_s`` or disagrees.
        """
        entry, generation = await asyncio.to_thread(self._decide, name, action)
        states = await self._wait_for(generation, name, served(entry))
        return entry, states

    def _decide(self, name: str, action: Action) -> tuple[ModelEntry, int]:
        if not self.repository.ready:
            raise ModelNotReady("the model repository is still loading; retry")
        with self._apply_lock, file_lock(self.runtime.control_lock):
            record = self._read_control()
            self._apply(record)  # decisions of others first, in order
            entry = self.repository.load(name) if action == "load" else self.repository.unload(name)
            generation = int(record.get("generation", 0)) + 1
            record["generation"] = generation
            record.setdefault("models", {})[name] = {"action": action, "generation": generation}
            write_atomic(self.runtime.control, json.dumps(record).encode())
            self.applied = generation
            self._write_ack(generation)
            return entry, generation

    async def _wait_for(self, generation: int, name: str, expected: Served) -> list[WorkerState]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            states = self.workers()
            lagging = [s for s in states if s.generation < generation]
            differing = [
                s for s in states if s.generation >= generation and s.models.get(name) != expected
            ]
            if differing:
                raise WorkersOutOfStep(
                    f"model '{name}': worker(s) "
                    + ", ".join(f"{s.pid} serve {s.models.get(name)}" for s in differing)
                    + f" where worker {self.pid} serves {expected}"
                )
            if not lagging:
                return states
            if time.monotonic() > deadline:
                raise WorkersOutOfStep(
                    f"model '{name}': worker(s) "
                    + ", ".join(f"{s.pid} (at generation {s.generation})" for s in lagging)
                    + f" did not apply generation {generation} within {self.timeout_s:g} s"
                )
            await asyncio.sleep(self.poll_s / 2)

    def workers(self) -> list[WorkerState]:
        """Every live worker's last acknowledgement (files of exited workers are removed)."""
        states = []
        for path in self.runtime.workers.glob("*.json"):
            try:
                pid = int(path.stem)
                body = json.loads(path.read_bytes())
            except (ValueError, OSError):
                continue  # being replaced, or not ours
            if not pid_alive(pid):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            models = {
                k: [(int(v), str(s), str(variant)) for v, s, variant in vs]
                for k, vs in body["models"].items()
            }
            states.append(WorkerState(pid, int(body["generation"]), models))
        return sorted(states, key=lambda s: s.pid)

    # -- files ------------------------------------------------------------------------

    def _read_control(self) -> dict[str, Any]:
        try:
            record = json.loads((self.runtime.control).read_bytes())
        except FileNotFoundError:
            return {"generation": 0, "models": {}}
        return record if isinstance(record, dict) else {"generation": 0, "models": {}}

    def _apply(self, record: dict[str, Any]) -> None:
        """Apply the decisions newer than ``self.applied``, oldest first (caller holds
        ``_apply_lock``)."""
        pending = sorted(
            (int(d["generation"]), name, d["action"])
            for name, d in record.get("models", {}).items()
            if int(d["generation"]) > self.applied
        )
        for generation, name, action in pending:
            try:
                if action == "load":
                    self.repository.load(name)
                else:
                    self.repository.unload(name)
            except ServiceError as err:  # e.g. removed from disk since: nothing to apply
                log.info("worker %d: %s %s skipped: %s", self.pid, action, name, err)
            log.info("worker %d applied %s %s (generation %d)", self.pid, action, name, generation)
        self.applied = max(self.applied, int(record.get("generation", 0)))

    def _write_ack(self, generation: int) -> None:
        models = {e.name: served(e) for e in self.repository.entries()}
        body = {"pid": self.pid, "generation": generation, "models": models}
        write_atomic(self._ack_path, json.dumps(body).encode())
