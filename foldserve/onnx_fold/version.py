"""A user's ONNX file -> a complete model version: folded bytes and ``VersionMetadata``.

The one derivation behind both ways a user's own ONNX file enters the repository:
``python -m training import-onnx`` writes its result as a new version, and the
service derives it at load time for a version directory that holds only a
``model.onnx`` (:mod:`service.models.derived`, which caches it). Torch-free.

What it promises: the folded graph comes from :func:`fold_model` (which checks
itself in ONNX Runtime and refuses a result beyond its tolerance); inputs,
outputs, datatypes and shapes are read off the user's graph (``-1`` for every
symbolic or unknown axis); the reference batch is random inputs of those
shapes with the *original* file's outputs, so a served folded model is checked
against what the user gave. Every failure is a :class:`ModelVersionError`
whose message says what is wrong with the file.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import TensorProto
from pydantic import BaseModel

from foldserve.datatypes import ONNX_DATATYPES, REFERENCE_ATOL
from foldserve.model_format import (
    USER_FILE,
    ModelVersionError,
    Parity,
    ReferenceBatch,
    TensorData,
    TensorSpec,
    VersionFiles,
    VersionMetadata,
    sha256_hex,
)
from foldserve.model_graph import batchnorm_nodes
from foldserve.onnx_fold import FoldCheckFailed, OnnxFoldReport, fold_model
from foldserve.onnx_fold.check import OTHER_DIMS  # the self-check's sizes for symbolic axes

log = logging.getLogger(__name__)

DERIVATION = "onnx-fold/1"  # bump when a change to the folder must re-derive cached versions
METADATA_KEY = "derived_from"  # the metadata.json key that marks a version made from a user file
REFERENCE_BATCH = 4  # samples of the reference batch (a symbolic axis 0), at most
REFERENCE_VALUES = 1 << 16  # fewer samples when one has more input values (metadata.json)


class DerivedFrom(BaseModel):
    """``metadata.json["derived_from"]``: the version was derived from a user's ONNX file."""

    file: str  # the user's file name, as given
    sha256: str  # of the user's file: a replaced file is derived again
    derivation: str = DERIVATION
    unchanged: bool  # nothing to fold: the folded file is the user's file, byte for byte
    batchnorm_before: int
    batchnorm_after: int
    max_abs_diff: float  # the folder's own check, original against folded
    tolerance: float
    check_inputs: str


@dataclass(frozen=True)
class DerivedVersion:
    folded: bytes
    metadata: VersionMetadata
    report: OnnxFoldReport


def derived_from(metadata: VersionMetadata) -> DerivedFrom | None:
    """The ``derived_from`` record of a version's metadata; None for a trained export."""
    raw = (metadata.model_extra or {}).get(METADATA_KEY)
    return None if raw is None else DerivedFrom.model_validate(raw)


# -- reading the graph ---------------------------------------------------------------


def _spec(value: onnx.ValueInfoProto, kind: str) -> TensorSpec:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise ModelVersionError(f"{kind} '{value.name}' is not a tensor")
    datatype = ONNX_DATATYPES.get(tensor.elem_type)
    if datatype is None:
        elem = TensorProto.DataType.Name(tensor.elem_type)
        raise ModelVersionError(
            f"{kind} '{value.name}' has element type {elem}, which the V2 protocol cannot carry"
        )
    if not tensor.HasField("shape"):
        raise ModelVersionError(f"{kind} '{value.name}' declares no shape (its rank is unknown)")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(name=value.name, datatype=datatype, shape=dims)


def graph_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (initializers excluded: old exporters list them as inputs) and outputs of
    ``model`` as tensor specs; every symbolic or unknown axis is ``-1``."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):
        inferred = model  # outputs keep what the file declares
    constants = {init.name for init in model.graph.initializer}
    inputs = [_spec(v, "input") for v in model.graph.input if v.name not in constants]
    outputs = [_spec(v, "output") for v in inferred.graph.output]
    if not inputs:
        raise ModelVersionError("the graph has no inputs")
    return inputs, outputs


def reference_feeds(
    specs: list[TensorSpec], seed: int, other: int = OTHER_DIMS[0]
) -> dict[str, np.ndarray]:
    """Random inputs of the declared shapes: a symbolic axis 0 has up to
    :data:`REFERENCE_BATCH` samples (fewer when a sample has over :data:`REFERENCE_VALUES`
    input values, at least one), any other symbolic axis ``other``. Values:
    :meth:`TensorSpec.random`."""
    rng = np.random.default_rng(seed)
    per_sample = sum(math.prod(d if d >= 0 else other for d in spec.shape[1:]) for spec in specs)
    samples = max(1, min(REFERENCE_BATCH, REFERENCE_VALUES // max(per_sample, 1)))
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = [
            d if d >= 0 else (samples if axis == 0 else other) for axis, d in enumerate(spec.shape)
        ]
        feeds[spec.name] = spec.random(rng, shape)
    return feeds


def _session(model: bytes, label: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ONNX Runtime's own error types: report what it said
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise ModelVersionError(f"ONNX Runtime cannot load the {label} model: {reason}") from err


def _run(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], label: str
) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    try:
        return dict(zip(names, session.run(names, feeds), strict=True))
    except Exception as err:  # ONNX Runtime's own error types: report what it said
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise ModelVersionError(f"ONNX Runtime cannot run the {label} model: {reason}") from err


def reference_batch(
    specs: list[TensorSpec], session: ort.InferenceSession, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Reference inputs and the user's file's outputs for them: symbolic axes past 0 take
    the first of :data:`OTHER_DIMS` the file runs with (a deep CNN with symbolic
    height and width does not run on 8x8)."""
    symbolic = any(d < 0 for spec in specs for d in spec.shape[1:])
    sizes = OTHER_DIMS if symbolic else OTHER_DIMS[:1]
    for other in sizes[:-1]:
        feeds = reference_feeds(specs, seed, other)
        try:
            return feeds, _run(session, feeds, "original")
        except ModelVersionError:
            continue  # too small for this graph: the next size
    feeds = reference_feeds(specs, seed, sizes[-1])
    return feeds, _run(session, feeds, "original")


def _output_specs(declared: list[TensorSpec], outputs: dict[str, np.ndarray]) -> list[TensorSpec]:
    """Declared outputs; one whose rank the graph leaves unknown gets it from a real run."""
    specs = []
    for spec in declared:
        got = outputs[spec.name]
        if len(spec.shape) != got.ndim:
            spec = TensorSpec(name=spec.name, datatype=spec.datatype, shape=(-1,) * got.ndim)
        specs.append(spec)
    return specs


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, x in a.items():
        diff = np.abs(x.astype(np.float64) - b[name].astype(np.float64))
        worst = max(worst, float(np.nanmax(diff, initial=0.0)))
    return worst


def _framework(model: onnx.ModelProto) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for package in ("onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            found[package] = package_version(package)
        except PackageNotFoundError:
            continue
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    producer = f"{model.producer_name} {model.producer_version}".strip()
    return {**found, "opset": opset, "producer": producer or "unknown"}


# -- the derivation ------------------------------------------------------------------


def parse_onnx(source: bytes, label: str = USER_FILE) -> onnx.ModelProto:
    """``source`` as an ONNX model that passes ``onnx.checker``; else :class:`ModelVersionError`."""
    try:
        model = onnx.load_model_from_string(source)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ModelVersionError(f"{label} is not an ONNX model: {err}") from err
    if not model.graph.node and not model.graph.output:
        raise ModelVersionError(f"{label} is not an ONNX model (no graph)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise ModelVersionError(f"{label} fails onnx.checker: {first}") from err
    return model


def derive_version(
    source: bytes,
    name: str,
    *,
    source_file: str = USER_FILE,
    files: VersionFiles | None = None,
    tolerance: float | None = None,
    seed: int = 0,
) -> DerivedVersion:
    """Fold ``source`` (a user's ONNX file) and describe the result as a version of ``name``.

    ``files`` names the folded and the unfolded (the user's) file as they will be
    stored; ``sha256`` is filled for both names. Raises :class:`ModelVersionError`
    when the file is not ONNX, fails the checker, its inputs cannot be carried by
    the V2 protocol, ONNX Runtime cannot run it, or the fold fails its own check.
    """
    files = files or VersionFiles()
    model = parse_onnx(source, source_file)
    inputs, declared_outputs = graph_specs(model)
    try:
        outcome = fold_model(model, tolerance=tolerance, seed=seed)
    except FoldCheckFailed as err:
        raise ModelVersionError(f"{source_file}: the folded graph failed its check: {err}") from err
    except Exception as err:  # a graph the folder cannot handle: a load failure, not a crash
        log.warning("folding %s failed", source_file, exc_info=True)
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise ModelVersionError(f"{source_file}: folding failed: {reason}") from err
    report = outcome.report
    unchanged = not report.folded
    folded_model = model if unchanged else outcome.model
    folded = source if unchanged else folded_model.SerializeToString()

    feeds, expected = reference_batch(inputs, _session(source, "original"), seed)
    got = _run(_session(folded, "folded"), feeds, "folded")
    outputs = _output_specs(declared_outputs, expected)
    diff = _max_diff(expected, got)
    floor = max((REFERENCE_ATOL.get(s.datatype, 0.0) for s in outputs), default=0.0)
    atol = max(report.tolerance, 4 * diff, floor)
    if not diff <= max(report.tolerance, floor):
        raise ModelVersionError(
            f"{source_file}: folded and original outputs differ by {diff:.3g} on the "
            f"reference batch (tolerance {max(report.tolerance, floor):.3g})"
        )
    bn = {"folded": batchnorm_nodes(folded_model), "unfolded": batchnorm_nodes(model)}
    metadata = VersionMetadata(
        name=name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        framework=_framework(model),
        files=files,
        sha256={files.folded: sha256_hex(folded), files.unfolded: sha256_hex(source)},
        inputs=inputs,
        outputs=outputs,
        fold_report=report.fold_record(),
        bn_nodes=bn,
        parity=Parity(
            max_abs_diff=max(report.max_abs_diff, diff),
            atol=report.tolerance,
            samples=next(iter(feeds.values())).shape[0] if feeds else 1,
            inputs=f"the larger of the fold's own check ({report.check_inputs}) "
            "and the reference batch",
        ),
        reference=ReferenceBatch(
            inputs={k: TensorData.of(v) for k, v in feeds.items()},
            outputs={k: TensorData.of(v) for k, v in expected.items()},
            atol=atol,
        ),
    )
    record = DerivedFrom(
        file=source_file,
        sha256=sha256_hex(source),
        unchanged=unchanged,
        batchnorm_before=report.batchnorm_before,
        batchnorm_after=report.batchnorm_after,
        max_abs_diff=report.max_abs_diff,
        tolerance=report.tolerance,
        check_inputs=report.check_inputs,
    )
    metadata = metadata.model_copy(update={METADATA_KEY: record.model_dump()})
    return DerivedVersion(folded, metadata, report)
