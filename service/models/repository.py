"""ModelRepository: scan ``models/``, validate and load versions, serve, hot-swap.

A version is served only after it passed every check: ``metadata.json`` parses,
the sha256 of the folded file matches, the ONNX Runtime session's inputs and
outputs agree with the metadata, and the reference batch reproduces the
expected outputs within ``reference.atol``; then it is warmed up at every batch
size its batcher may form (``version_checks.warm_up``), before it is marked
ready or swapped in, so the first requests are not the slow ones. A version
that fails is kept as UNAVAILABLE with its reason; it never takes the
server down and never replaces a version that is serving.

Readers take no lock: each (re)scan builds new immutable entries and swaps the
whole name -> entry mapping in one assignment. Scans are serialized by a lock.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from foldserve.model_format import (
    VERSION_DIR,
    ModelVersionError,
    Variant,
    valid_model_name,
    version_numbers,
)
from service.errors import ModelNotFound, ModelNotReady, ModelUnavailable
from service.models.config import (
    BatchingOverrides,
    ModelSettings,
    VersionPolicy,
    read_model_config,
)
from service.models.derived import DerivedVersions, open_version
from service.models.served_version import ServedVersion, ServingOptions, variant_bytes
from service.models.version_checks import check_io, check_reference, warm_up
from service.process.runtime_dir import RuntimeDir
from service.protocol import ModelState

log = logging.getLogger(__name__)

NOT_SELECTED = "not selected by version policy"  # a skipped version's reason starts so
Fingerprint = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: ModelState
    reason: str = ""
    model: ServedVersion | None = None
    fingerprint: Fingerprint | None = None  # the files this status was computed from
    variant: Variant = "folded"  # the variant config.json asked for then


@dataclass(frozen=True)
class ModelEntry:
    """One model directory's versions as of its last scan (never mutated)."""

    name: str
    versions: dict[int, VersionStatus] = field(default_factory=dict)
    reason: str = ""  # why the model as a whole cannot serve, when it cannot
    unloaded: bool = False
    config: ModelSettings = ModelSettings()  # from config.json as of this scan
    _default: VersionStatus | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        # Computed once: every unversioned request asks for it.
        ready = [s for s in self.versions.values() if s.model is not None]
        object.__setattr__(self, "_default", max(ready, key=lambda s: s.version, default=None))

    def default(self) -> VersionStatus | None:
        """The highest READY version: what an unversioned request gets."""
        return self._default

    def ready_versions(self) -> list[int]:
        return sorted(v for v, s in self.versions.items() if s.model is not None)

    def why_not_ready(self) -> str:
        if self.reason:
            return self.reason
        if not self.versions:
            return "no version directories"
        return "; ".join(f"version {v}: {s.reason}" for v, s in sorted(self.versions.items()))


def _fingerprint(version_dir: Path) -> Fingerprint:
    files = []
    for path in sorted(version_dir.iterdir()):
        if path.name.startswith("."):  # e.g. the derived cache of a bare model.onnx
            continue
        st = path.stat()
        files.append((path.name, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(files)


class ModelRepository:
    """The models under ``root``, each version validated, loaded and warmed up.

    A version that leaves service (swapped out, removed, unloaded) is closed. A bare
    ``model.onnx`` is served through its derived folded twin, cached beside it or, in a
    read-only repository, under ``runtime`` (:mod:`service.models.derived`).
    """

    def __init__(
        self, root: Path, options: ServingOptions, runtime: RuntimeDir | None = None
    ) -> None:
        self.root = root
        self.options = options
        self._derived = DerivedVersions(runtime)
        self._models: dict[str, ModelEntry] = {}
        self._scan_lock = threading.Lock()
        self._loaded = threading.Event()

    @property
    def ready(self) -> bool:
        """True once the first full scan has finished."""
        return self._loaded.is_set()

    # -- reading (lock-free) -------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        models = self._models
        return [models[name] for name in sorted(models)]

    def entry(self, name: str) -> ModelEntry:
        found = self._models.get(name)
        if found is not None:
            return found
        if not self.ready:
            raise ModelNotReady("the model repository is still loading")
        known = ", ".join(sorted(self._models)) or "none"
        raise ModelNotFound(f"unknown model '{name}'; models: {known}")

    def metric_label(self, name: str) -> str:
        """``name`` when the repository knows it, else ``unknown`` (bounded label values)."""
        return name if name in self._models else "unknown"

    def resolve(self, name: str, version: str | None) -> tuple[ModelEntry, VersionStatus | None]:
        """The entry and the addressed version (None: the default one, which may not exist)."""
        entry = self.entry(name)
        if version is None:
            return entry, entry.default()
        number = int(version) if VERSION_DIR.fullmatch(version) else None
        if number is None or number not in entry.versions:
            known = ", ".join(str(v) for v in sorted(entry.versions)) or "none"
            raise ModelNotFound(f"unknown version '{version}' of model '{name}'; versions: {known}")
        return entry, entry.versions[number]

    def get(self, name: str, version: str | None = None) -> ServedVersion:
        """The model to run: :class:`ModelNotFound` for unknown names or versions,
        :class:`ModelUnavailable` when the model or version cannot serve, and
        :class:`ModelNotReady` while the repository is still loading."""
        entry, status = self.resolve(name, version)
        if status is not None and status.model is not None:
            return status.model
        if status is None:
            raise ModelUnavailable(f"model '{name}' has no ready version: {entry.why_not_ready()}")
        raise ModelUnavailable(f"model '{name}' version {version} is not ready: {status.reason}")

    # -- scanning (serialized) -----------------------------------------------

    def load_all(self, before_ready: Callable[[], None] | None = None) -> None:
        """The first scan: every model directory; marks the repository ready at the end,
        after ``before_ready()`` (management decisions to apply first)."""
        try:
            self.refresh()
            if before_ready is not None:
                before_ready()
        except OSError as err:  # the repository itself is unreadable: serve nothing, say why
            log.error("cannot scan the model repository %s: %s", self.root, err)
        finally:
            self._loaded.set()
        log.info(
            "repository %s: %d model(s), %d ready",
            self.root,
            len(self._models),
            sum(1 for e in self._models.values() if e.default() is not None),
        )

    def refresh(self) -> None:
        """Rescan every model not explicitly unloaded; new files only are validated."""
        with self._scan_lock:
            if not self.root.is_dir():  # e.g. a volume not mounted (yet): keep what serves
                log.warning("model repository %s is not a directory", self.root)
                return
            on_disk = set(self._model_dirs())
            for gone in set(self._models) - on_disk:
                log.info("model %s: directory removed; no longer served", gone)
                self._publish_without(gone)
            for name in sorted(on_disk):
                previous = self._models.get(name)
                if previous is not None and previous.unloaded:
                    continue
                self._publish(self._scan_model(name, previous, retry_failed=False))

    def load(self, name: str) -> ModelEntry:
        """Rescan one model (new versions load, failed ones are retried), then swap it in."""
        with self._scan_lock:
            if not valid_model_name(name) or not (self.root / name).is_dir():
                self._publish_without(name)
                raise ModelNotFound(f"no model directory '{name}' in the repository")
            previous = self._models.get(name)
            if previous is not None and previous.unloaded:
                previous = None
            entry = self._scan_model(name, previous, retry_failed=True)
            self._publish(entry)
            return entry

    def unload(self, name: str) -> ModelEntry:
        """Stop serving every version of ``name`` (until the next explicit load)."""
        with self._scan_lock:
            entry = self.entry(name)
            statuses = {v: VersionStatus(v, "UNAVAILABLE", "unloaded") for v in entry.versions}
            unloaded = ModelEntry(name, statuses, reason="unloaded", unloaded=True)
            self._publish(unloaded)
            log.info("model %s: unloaded", name)
            return unloaded

    def _publish(self, entry: ModelEntry) -> None:
        previous = self._models.get(entry.name)
        for status in entry.versions.values():
            if status.model is not None:
                status.model.configure(entry.config.batching)
        self._models = {**self._models, entry.name: entry}
        _close_retired(previous, entry)
        self._count_ready()

    def _publish_without(self, name: str) -> None:
        if name in self._models:
            previous = self._models[name]
            self._models = {k: v for k, v in self._models.items() if k != name}
            _close_retired(previous, None)
            self._count_ready()

    def _count_ready(self) -> None:
        ready = sum(len(entry.ready_versions()) for entry in self._models.values())
        self.options.metrics.models_ready.set(ready)

    def _model_dirs(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and valid_model_name(p.name)
        )

    def _scan_model(
        self, name: str, previous: ModelEntry | None, *, retry_failed: bool
    ) -> ModelEntry:
        model_dir = self.root / name
        try:
            config = read_model_config(model_dir)
        except ModelVersionError as err:
            log.warning("model %s: %s; keeping what was served", name, err)
            kept = previous.versions if previous is not None else {}
            old = previous.config if previous is not None else ModelSettings()
            return ModelEntry(
                name, kept, reason=f"config.json: {err}" if not kept else "", config=old
            )
        policy = config.policy
        try:
            numbers = version_numbers(model_dir)[::-1]  # newest first
        except OSError as err:
            return ModelEntry(name, {}, reason=f"unreadable: {err}")
        statuses: dict[int, VersionStatus] = {}
        ready = 0
        for number in numbers:
            skip = self._policy_skip(policy, number, ready)
            if skip:
                statuses[number] = VersionStatus(number, "UNAVAILABLE", skip)
                continue
            status = self._version_status(model_dir / str(number), previous, retry_failed, config)
            ready += status.model is not None
            statuses[number] = status
        return ModelEntry(name, statuses, config=config)

    @staticmethod
    def _policy_skip(policy: VersionPolicy, number: int, ready: int) -> str:
        selected = (
            policy.kind == "all"
            or (policy.kind == "latest" and ready < policy.latest)
            or (policy.kind == "specific" and number in policy.versions)
        )
        return "" if selected else f"{NOT_SELECTED} {policy.describe()}"

    def _version_status(
        self,
        version_dir: Path,
        previous: ModelEntry | None,
        retry_failed: bool,
        config: ModelSettings,
    ) -> VersionStatus:
        """The version's status for ``config``: the previous one when its files and the
        variant asked for are unchanged, else a (re)load. A served version whose variant
        cannot be switched to keeps serving the one it has, the failure as its reason."""
        number = int(version_dir.name)
        try:
            fingerprint = _fingerprint(version_dir)
        except OSError as err:
            return VersionStatus(number, "UNAVAILABLE", f"unreadable: {err}")
        old = previous.versions.get(number) if previous is not None else None
        if old is not None and old.fingerprint == fingerprint and old.variant == config.variant:
            if old.model is not None or not retry_failed:
                return old
        status = self._load_version(version_dir, fingerprint, config.batching, config.variant)
        if status.model is None and old is not None and old.model is not None:
            if old.fingerprint == fingerprint:
                reason = (
                    f"variant '{config.variant}' not loaded: {status.reason}; still serving "
                    f"variant '{old.model.variant}'"
                )
                log.warning("model %s version %d: %s", version_dir.parent.name, number, reason)
                return replace(old, reason=reason, variant=config.variant)
        return status

    def _load_version(
        self,
        version_dir: Path,
        fingerprint: Fingerprint,
        batching: BatchingOverrides,
        variant: Variant,
    ) -> VersionStatus:
        name, number = version_dir.parent.name, int(version_dir.name)
        try:
            opened = open_version(version_dir, self._derived)
            served = opened.folded
            if variant != "folded":
                try:
                    served = variant_bytes(opened.metadata, version_dir, variant)
                except ModelVersionError as err:
                    raise ModelVersionError(
                        f"config.json asks for variant '{variant}': {err}"
                    ) from err
            session = self.options.factory.create(served)
            model = ServedVersion(
                opened.metadata,
                version_dir,
                session,
                self.options,
                batching,
                opened.folded_dir,
                variant,
            )
            try:
                check_io(model)
                diff = check_reference(model)
                warmed = model.batcher.in_thread(functools.partial(warm_up, model))
            except BaseException:
                model.close()
                raise
        except ModelVersionError as err:
            log.warning("model %s version %d not served: %s", name, number, err)
            return VersionStatus(number, "UNAVAILABLE", str(err), None, fingerprint, variant)
        except Exception as err:  # ONNX Runtime's own errors: corrupt graph, failing kernel
            reason = f"onnxruntime: {type(err).__name__}: {err}".splitlines()[0]
            log.warning("model %s version %d not served: %s", name, number, reason)
            return VersionStatus(number, "UNAVAILABLE", reason, None, fingerprint, variant)
        log.info(
            "model %s version %d ready: variant %s, provider %s, %d threads, io_binding %s, "
            "reference max abs diff %.3g, files: %s, warmed at batch sizes %s",
            name,
            number,
            variant,
            model.provider,
            model.threads,
            model.io_binding,
            diff,
            opened.source,
            ", ".join(f"{n} ({s * 1e3:.2f} ms)" for n, s in warmed.items()) or "none",
        )
        return VersionStatus(number, "READY", "", model, fingerprint, variant)


def _close_retired(previous: ModelEntry | None, current: ModelEntry | None) -> None:
    """Close the served versions of ``previous`` that ``current`` no longer holds."""
    if previous is None:
        return
    keep = set() if current is None else {id(s.model) for s in current.versions.values()}
    for status in previous.versions.values():
        if status.model is not None and id(status.model) not in keep:
            status.model.close()
