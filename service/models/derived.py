"""Versions that arrive as a user's bare ``model.onnx``: derive the folded twin, cache it.

A version directory that holds a ``model.onnx`` and neither ``metadata.json`` nor
``model.unfolded.onnx`` is a user's own ONNX file (an export is renamed into
place whole, so it is never seen without its metadata). At load the service
derives what an export would have written
(:func:`foldserve.onnx_fold.derive_version`: the folded file, specs read off the
graph, the fold report, a reference batch with the user's
own outputs) and caches it, content-addressed by the sha256 of the user's file:

```
models/NAME/V/model.onnx                        the user's file (the unfolded variant)
models/NAME/V/.foldserve/<sha256>/model.folded.onnx
models/NAME/V/.foldserve/<sha256>/metadata.json
<runtime>/derived/<sha256>/...                  the same, when the repository is read-only
```

The repository scan ignores both: model directories only count version
directories, and a version's fingerprint skips dot names. A replaced
``model.onnx`` has another sha256, so it is derived again (and the stale entry
beside it removed). Worker processes derive under a file lock, so one of them
derives and the others read its result; an entry appears by one ``rename`` of a
complete directory, so no reader ever sees half of one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from foldserve.files import file_lock, staged_dir, write_synced
from foldserve.model_format import (
    METADATA_FILE,
    UNFOLDED_FILE,
    USER_FILE,
    ModelVersionError,
    VersionFiles,
    VersionMetadata,
    sha256_hex,
    verified_bytes,
)
from foldserve.onnx_fold.version import DERIVATION, derive_version, derived_from
from service.process.runtime_dir import RuntimeDir

log = logging.getLogger(__name__)

CACHE_DIR = ".foldserve"  # in the version directory
DERIVED_FILE = "model.folded.onnx"
DERIVED_FILES = VersionFiles(folded=DERIVED_FILE, unfolded=USER_FILE)

Source = Literal["export", "cache", "derived"]


@dataclass(frozen=True)
class OpenedVersion:
    """A version ready to load: its metadata, the directory its folded file lives in, the
    folded bytes (verified against the metadata's sha256), and where they came from: an
    export's own files, a derived cache entry, or a derivation just now."""

    metadata: VersionMetadata
    folded_dir: Path
    folded: bytes
    source: Source


def is_bare(version_dir: Path) -> bool:
    """A user's ``model.onnx``, without ``metadata.json`` and without an unfolded twin (an
    export that lost its metadata is not served as a user's file: it fails as it is)."""
    return (
        not (version_dir / METADATA_FILE).exists()
        and not (version_dir / UNFOLDED_FILE).exists()
        and (version_dir / USER_FILE).is_file()
    )


def open_version(version_dir: Path, derived: DerivedVersions) -> OpenedVersion:
    """Any version's metadata and folded bytes: an export's, or a bare version's derived twin.

    Raises :class:`ModelVersionError` with the reason the version cannot be served.
    """
    if is_bare(version_dir):
        return derived.load(version_dir)
    metadata = VersionMetadata.read(version_dir)
    data = verified_bytes(version_dir, metadata.files.folded, metadata.sha256)
    return OpenedVersion(metadata, version_dir, data, "export")


class DerivedVersions:
    """Derives and caches the folded twin of bare versions (see the module docstring).

    ``runtime`` is the server's writable runtime directory: its ``derived`` directory is
    the cache when the repository cannot take one (None: no fallback, such a version
    fails to load).
    """

    def __init__(self, runtime: RuntimeDir | None = None) -> None:
        self.runtime_cache = runtime.derived if runtime is not None else None

    def load(self, version_dir: Path) -> OpenedVersion:
        """The derived version of ``version_dir/model.onnx``, from a cache or derived now.

        Raises :class:`ModelVersionError` with the reason the file cannot be served.
        """
        try:
            source = (version_dir / USER_FILE).read_bytes()
        except OSError as err:
            raise ModelVersionError(f"{USER_FILE} is unreadable: {err}") from err
        key = sha256_hex(source)
        name, number = version_dir.parent.name, int(version_dir.name)
        places = [version_dir / CACHE_DIR]
        if self.runtime_cache is not None:
            places.append(self.runtime_cache)
        for place in places:
            found = _read_entry(place / key, key)
            if found is not None:
                return _as_version(found, name, number, "cache")
        failures = []
        for place in places:
            try:
                place.mkdir(parents=True, exist_ok=True)
                with file_lock(place / f"{key}.lock"):  # one deriving process at a time
                    found = _read_entry(place / key, key)  # another worker derived it meanwhile
                    if found is None:
                        found = _derive_into(place, key, source, name)
                    return _as_version(found, name, number, found.source)
            except OSError as err:  # not writable here (a read-only repository): the next place
                log.info(
                    "model %s version %d: no derived cache in %s: %s", name, number, place, err
                )
                failures.append(f"{place}: {err.strerror or err}")
        if self.runtime_cache is None:
            failures.append("the server has no runtime directory")
        raise ModelVersionError(
            f"{USER_FILE} has no {METADATA_FILE}, and its folded variant cannot be cached: "
            + "; ".join(failures)
        )


def _as_version(found: OpenedVersion, name: str, number: int, source: Source) -> OpenedVersion:
    # Entries are content-addressed (two models may share one): name and number from here.
    metadata = found.metadata.model_copy(update={"name": name, "version": number})
    return OpenedVersion(metadata, found.folded_dir, found.folded, source)


def _read_entry(entry: Path, key: str) -> OpenedVersion | None:
    """The cached entry for ``key``; None when there is none or it is unusable (stale
    derivation, corrupt files: derived again)."""
    if not entry.is_dir():
        return None
    try:
        metadata = VersionMetadata.read(entry)
        record = derived_from(metadata)
        if record is None or record.sha256 != key or record.derivation != DERIVATION:
            log.info("derived cache %s is stale; deriving again", entry)
            return None
        folded = verified_bytes(entry, metadata.files.folded, metadata.sha256)
    except (ModelVersionError, ValueError, OSError) as err:
        log.warning("derived cache %s is unusable (%s); deriving again", entry, err)
        return None
    return OpenedVersion(metadata, entry, folded, "cache")


def _derive_into(place: Path, key: str, source: bytes, name: str) -> OpenedVersion:
    """Derive, write the entry under a temporary name and rename it into place."""
    derived = derive_version(source, name, files=DERIVED_FILES)
    entry = place / key
    with staged_dir(place, prefix=f".tmp-{key[:12]}-") as tmp:
        (tmp / DERIVED_FILE).write_bytes(derived.folded)
        write_synced(tmp / METADATA_FILE, derived.metadata.to_json())
        if entry.exists():  # an unusable entry (checked under the lock): replace it
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    if place.name == CACHE_DIR:  # beside the file: entries of replaced files go
        for stale in place.iterdir():
            if key[:12] not in stale.name:
                _remove(stale)
    report = derived.report
    log.info(
        "model %s: derived the folded variant of model.onnx (%d -> %d BatchNormalization, "
        "max abs diff %.3g) into %s",
        name,
        report.batchnorm_before,
        report.batchnorm_after,
        report.max_abs_diff,
        entry,
    )
    return OpenedVersion(derived.metadata, entry, derived.folded, "derived")


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
