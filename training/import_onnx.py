"""``python -m training import-onnx FILE``: a user's ONNX file as a new repository version.

The version is what an export writes: ``model.onnx`` (folded), ``model.unfolded.onnx``
(the user's file, byte for byte) and ``metadata.json`` with the fold report, the
BatchNormalization counts of both files, their sha256, parity and a reference
batch (random inputs of the declared shapes, the user's file's outputs). The
derivation is the service's own (:func:`service.onnx_fold.derive_version`), the
one a server runs for a bare ``model.onnx`` dropped into the repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from service.model_format import (
    FOLDED_FILE,
    UNFOLDED_FILE,
    ModelVersionError,
    VersionMetadata,
    valid_model_name,
    write_version,
)
from service.onnx_fold import OnnxFoldReport, derive_version
from training.terminal import console, fail


class OnnxImportError(ValueError):
    """The file cannot become a version; nothing was written."""


@dataclass(frozen=True)
class ImportResult:
    path: Path  # the version directory
    version: int
    metadata: VersionMetadata
    report: OnnxFoldReport


def import_onnx(
    file: Path,
    repository: Path,
    name: str,
    version: int | None = None,
    tolerance: float | None = None,
) -> ImportResult:
    """Fold ``file``, check it, and write it as ``version`` (None: the next) of ``name``."""
    if not valid_model_name(name):
        raise OnnxImportError(
            f"bad model name {name!r}: use letters, digits, '_', '-', '.' (not starting with '.')"
        )
    try:
        source = file.read_bytes()
    except OSError as err:
        raise OnnxImportError(f"cannot read {file}: {err}") from err
    model_dir = repository / name
    try:
        derived = derive_version(source, name, source_file=file.name, tolerance=tolerance)
        files = {FOLDED_FILE: derived.folded, UNFOLDED_FILE: source}
        number = write_version(model_dir, files, derived.metadata, version=version)
    except ModelVersionError as err:
        raise OnnxImportError(str(err)) from err
    path = model_dir / str(number)
    return ImportResult(path, number, VersionMetadata.read(path), derived.report)


def import_onnx_cmd(
    file: Annotated[Path, typer.Argument(help="the user's ONNX file (BN nodes may remain)")],
    name: Annotated[str, typer.Option(help="model name in the repository")],
    repository: Annotated[Path, typer.Option(help="model repository root")] = Path("models"),
    version: Annotated[
        int | None, typer.Option(min=1, help="version number to claim (default: the next)")
    ] = None,
    tolerance: Annotated[
        float | None, typer.Option(min=0.0, help="largest output difference the fold may make")
    ] = None,
) -> None:
    """Add a user's ONNX file as a new version: folded, checked, with full metadata."""
    try:
        with console.status(f"folding and checking {file}"):
            result = import_onnx(file, repository, name, version, tolerance)
    except OnnxImportError as err:
        fail(str(err))
        return
    md = result.metadata
    parity = md.parity.max_abs_diff if md.parity is not None else float("nan")
    for line in result.report.summary():
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    console.print(
        f"wrote {result.path}: BN nodes {md.bn_nodes['unfolded']} -> {md.bn_nodes['folded']}, "
        f"max abs diff folded vs original {parity:.3g}",
        highlight=False,
        soft_wrap=True,
    )
