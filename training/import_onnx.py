"""``python -m training import-onnx FILE``: a user's ONNX file as a new repository version.

The version is what an export writes: ``model.onnx`` (folded), ``model.unfolded.onnx``
(the user's file, byte for byte) and ``metadata.json`` with the fold report, the
BatchNormalization counts of both files, their sha256, parity and a reference
batch (random inputs of the declared shapes, the user's file's outputs). The
derivation is the service's own (:func:`foldserve.onnx_fold.derive_version`), the
one a server runs for a bare ``model.onnx`` dropped into the repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from foldserve.model_format import (
    FOLDED_FILE,
    INT8_FILE,
    UNFOLDED_FILE,
    ModelVersionError,
    VersionMetadata,
    valid_model_name,
    write_version,
)
from foldserve.onnx_fold import OnnxFoldReport, derive_version
from training import int8_cli as q
from training.quantize import Int8Error, Int8Options, Samples, build_int8
from training.terminal import console, fail

NO_CALIBRATION = (
    "no INT8 file: a model without a run needs samples to calibrate on "
    "(--calibration FILE.npz with the input array as 'X' or by its name, labels as 'y')"
)


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
    int8: tuple[Path, Int8Options] | None = None,
) -> ImportResult:
    """Fold ``file``, check it, and write it as ``version`` (None: the next) of ``name``;
    with ``int8`` (a calibration ``.npz`` and the options), also ``model.int8.onnx``."""
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
        metadata = derived.metadata
        if int8 is not None:
            files[INT8_FILE], metadata = quantize_import(derived.folded, metadata, *int8)
        number = write_version(model_dir, files, metadata, version=version)
    except (ModelVersionError, Int8Error) as err:
        raise OnnxImportError(str(err)) from err
    path = model_dir / str(number)
    return ImportResult(path, number, VersionMetadata.read(path), derived.report)


def quantize_import(
    folded: bytes, metadata: VersionMetadata, calibration: Path, options: Int8Options
) -> tuple[bytes, VersionMetadata]:
    """``model.int8.onnx`` of an imported model, calibrated on the user's ``.npz`` (array
    ``X`` or the input's name; ``y``, optional, the labels). The same samples choose the
    method and measure accuracy (or FP32 agreement without ``y``): there is no other
    split, and the record says so. Raises :class:`Int8Error`."""
    if len(metadata.inputs) != 1 or metadata.inputs[0].datatype != "FP32":
        raise Int8Error("--calibration quantizes models with one FP32 input only")
    spec, output = metadata.inputs[0], metadata.outputs[0].name
    try:
        with np.load(calibration) as data:
            key = spec.name if spec.name in data else "X"
            x = np.asarray(data[key], dtype=np.float32)
            y = np.asarray(data["y"]) if "y" in data else None
    except (OSError, ValueError, KeyError) as err:
        raise Int8Error(f"cannot read calibration file {calibration}: {err}") from err
    if not spec.accepts(tuple(x.shape)) or (y is not None and y.shape != (len(x),)):
        raise Int8Error(
            f"calibration file {calibration.name}: '{key}' has shape {list(x.shape)}, the model "
            f"takes {list(spec.shape)}" + ("" if y is None else f"; 'y' has {list(y.shape)}")
        )
    what = f"samples of {calibration.name} (the calibration file)"
    samples = Samples(x, y, what)
    reference = metadata.reference.inputs[spec.name].array()
    data_int8, record = build_int8(
        folded, (spec.name, output), samples, samples, samples, reference, options
    )
    files = metadata.files.model_copy(update={"int8": INT8_FILE})
    return data_int8, metadata.model_copy(update={"files": files, "int8": record})


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
    int8: q.Int8Option = False,
    calibration: Annotated[
        Path | None,
        typer.Option(help="with --int8: .npz of inputs ('X' or the input's name), labels 'y'"),
    ] = None,
    int8_tolerance: q.Int8ToleranceOption = q.DEFAULT_TOLERANCE,
    calibration_samples: q.CalibrationSamplesOption = q.DEFAULT_SAMPLES,
    calibration_method: q.CalibrationMethodOption = q.DEFAULT_METHODS,
) -> None:
    """Add a user's ONNX file as a new version: folded, checked, with full metadata;
    with --int8 and --calibration also model.int8.onnx."""
    options = q.int8_options(int8, int8_tolerance, calibration_samples, calibration_method)
    quantize = None if options is None or calibration is None else (calibration, options)
    try:
        with console.status(f"folding and checking {file}"):
            result = import_onnx(file, repository, name, version, tolerance, quantize)
    except OnnxImportError as err:
        fail(str(err))
        return
    md = result.metadata
    parity = md.parity.max_abs_diff if md.parity is not None else float("nan")
    for line in result.report.summary():
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    q.print_int8(md.int8)
    if options is not None and calibration is None:
        console.print(NO_CALIBRATION, highlight=False, soft_wrap=True, markup=False)
    console.print(
        f"wrote {result.path}: BN nodes {md.bn_nodes['unfolded']} -> {md.bn_nodes['folded']}, "
        f"max abs diff folded vs original {parity:.3g}",
        highlight=False,
        soft_wrap=True,
    )
