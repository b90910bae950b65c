"""Export a trained run as a model-repository version: folded and unfolded ONNX + metadata.

Layout and ``metadata.json`` fields: ``docs/model-repository.md``. Each export
checks itself before it becomes visible: ``onnx.checker`` on both files, ONNX
Runtime outputs of both against the PyTorch eval outputs (``atol``) and against
each other. The version is assembled in a ``.tmp-*`` directory and renamed into
place, so a failed check leaves no version directory and a reader never sees a
half-written one.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from foldserve.datatypes import REFERENCE_ATOL, V2_DATATYPES
from foldserve.model_format import (
    FOLDED_FILE,
    INT8_FILE,
    UNFOLDED_FILE,
    ModelVersionError,
    Parity,
    ReferenceBatch,
    TensorData,
    TensorSpec,
    VersionMetadata,
    valid_model_name,
    write_version,
)
from foldserve.model_graph import batchnorm_nodes
from training.data import Dataset, load_dataset
from training.fold import FoldReport, fold_batchnorm
from training.onnx_graph import export_onnx
from training.quantize import Int8Error, Int8Options, Samples, build_int8
from training.train import Run, load_run
from training.zoo import count_batchnorms

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "input", "logits"
# What `export --dtype` writes: the numpy name of the dtype -> the torch dtype.
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
PARITY_SAMPLES = 64  # inputs of the folded-vs-unfolded checks of `fold` and `export`


class ExportError(RuntimeError):
    """An export that failed one of its own checks; nothing was written."""


@dataclass
class ExportResult:
    path: Path  # the version directory
    version: int
    metadata: VersionMetadata
    report: FoldReport


RANDOM_INPUTS = "seeded random normal inputs"
TEST_INPUTS = "samples of the run's test split"


def run_dataset(run: Run) -> Dataset:
    """The run's dataset, rebuilt from what the run recorded (same splits).

    Raises ``KeyError``, ``ValueError`` or ``OSError`` when it cannot be (e.g. a data
    file that moved).
    """
    spec = run.config.get("dataset", {})
    kwargs: dict[str, Any] = {"seed": spec.get("seed", 0)}
    if spec.get("name") == "synthetic":
        kwargs.update(
            shape=tuple(spec["shape"]), num_classes=spec["num_classes"], n_samples=spec["n_samples"]
        )
    return load_dataset(
        spec["name"], path=spec.get("path"), label_column=spec.get("label_column"), **kwargs
    )


def reference_inputs(run: Run, n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """Up to ``n`` real test samples when the run's dataset can be rebuilt, else ``n``
    samples of seeded noise;
    and which of the two, in words (``TEST_INPUTS`` or ``RANDOM_INPUTS``)."""
    try:
        ds = run_dataset(run)
        if len(ds.X_test) >= min(n, 8):  # a small test split: all of it
            return ds.X_test[:n], TEST_INPUTS
    except (KeyError, ValueError, OSError) as err:
        log.info("dataset of %s not rebuildable (%s): reference batch is random", run.path, err)
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *run.model_cfg.input_shape)).astype(np.float32), RANDOM_INPUTS


@dataclass(frozen=True)
class ParityCheck:
    """Largest |folded - unfolded| output difference on ``samples`` inputs, and its bound."""

    where: str  # what ran both variants, e.g. "PyTorch" or "ONNX Runtime"
    max_abs_diff: float
    atol: float
    samples: int
    inputs: str  # what the inputs were

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        sign = "<=" if self.passed else ">"
        return (
            f"parity ({self.where}, folded vs unfolded, {self.samples} {self.inputs}): "
            f"max abs diff {self.max_abs_diff:.3g} {sign} tolerance {self.atol:g}: {verdict}"
        )


def torch_parity(run: Run, folded: nn.Module, samples: int = PARITY_SAMPLES) -> ParityCheck:
    """The folded against the run's unfolded model in PyTorch (float32), on the inputs
    and tolerance the export checks ONNX Runtime with."""
    x, inputs = reference_inputs(run, samples)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        diff = float((folded(xt) - run.model.eval()(xt)).abs().max())
    return ParityCheck("PyTorch", diff, REFERENCE_ATOL["FP32"], len(x), inputs)


def ort_outputs(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    out = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return np.asarray(out)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ExportError(message)


def _framework() -> dict[str, str]:
    return {pkg: pkg_version(pkg) for pkg in ("torch", "onnx", "onnxscript", "onnxruntime-gpu")}


def build_version(
    run: Run,
    name: str,
    dtype: torch.dtype = torch.float32,
    reference_size: int = 4,
    parity_size: int = PARITY_SAMPLES,
) -> tuple[bytes, bytes, VersionMetadata, FoldReport]:
    """Fold, export both variants, check them; return the two files and the metadata."""
    base: nn.Module = run.model.eval()
    x_all, x_kind = reference_inputs(run, parity_size)  # (P, *input_shape) float32
    np_dtype = np.dtype(str(dtype).removeprefix("torch."))
    x = x_all.astype(np_dtype)
    folded, report = fold_batchnorm(base, torch.from_numpy(x_all[:2]), dtype=dtype)
    unfolded = copy.deepcopy(base).to(dtype)
    with torch.no_grad():
        # The unfolded network in float64: the truth both exported variants approximate.
        expected = copy.deepcopy(base).double()(torch.from_numpy(x_all).double()).numpy()
    example = torch.from_numpy(x[:2])
    folded_proto = export_onnx(folded, example, INPUT_NAME, OUTPUT_NAME)
    unfolded_proto = export_onnx(unfolded, example, INPUT_NAME, OUTPUT_NAME)
    for label, proto in (("folded", folded_proto), ("unfolded", unfolded_proto)):
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as err:
            raise ExportError(f"{label} ONNX model fails onnx.checker: {err}") from err
    bn_modules = count_batchnorms(run.model)
    bn_unfolded = batchnorm_nodes(unfolded_proto)
    bn_folded = batchnorm_nodes(folded_proto)
    _check(
        bn_unfolded == bn_modules,
        f"unfolded ONNX has {bn_unfolded} BatchNormalization nodes, model has {bn_modules}",
    )
    _check(
        bn_folded == len(report.kept),
        f"folded ONNX has {bn_folded} BatchNormalization nodes, fold report kept "
        f"{len(report.kept)}",
    )
    folded_bytes, unfolded_bytes = (
        folded_proto.SerializeToString(),
        unfolded_proto.SerializeToString(),
    )
    y_folded = ort_outputs(folded_bytes, x)
    y_unfolded = ort_outputs(unfolded_bytes, x)
    atol = REFERENCE_ATOL[V2_DATATYPES[np_dtype]]
    diff_fu = float(np.abs(y_folded.astype(np.float64) - y_unfolded).max())
    diff_ft = float(np.abs(y_folded.astype(np.float64) - expected).max())
    diff_ut = float(np.abs(y_unfolded.astype(np.float64) - expected).max())
    for what, d in (
        ("folded vs unfolded", diff_fu),
        ("folded vs PyTorch", diff_ft),
        ("unfolded vs PyTorch", diff_ut),
    ):
        _check(d <= atol, f"ONNX Runtime parity failed: {what} max abs diff {d:.3g} > {atol}")
    ref_x, ref_y = x[:reference_size], y_folded[:reference_size]
    training = {k: v for k, v in run.metrics.items() if k != "history"}
    # How the run was made, beside its metrics: what `retrain` trains the next version with.
    recorded = {"dataset": run.config.get("dataset"), "config": run.config.get("train")}
    training.update({k: v for k, v in recorded.items() if v is not None})
    datatype = V2_DATATYPES[np_dtype]
    opset = next(o.version for o in folded_proto.opset_import if o.domain in ("", "ai.onnx"))
    metadata = VersionMetadata(
        name=name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        framework={**_framework(), "opset": opset},
        inputs=[
            TensorSpec(name=INPUT_NAME, datatype=datatype, shape=(-1, *run.model_cfg.input_shape))
        ],
        outputs=[
            TensorSpec(name=OUTPUT_NAME, datatype=datatype, shape=(-1, run.model_cfg.num_classes))
        ],
        labels=run.labels,
        features=run.features,
        network=run.model_cfg.to_dict(),
        training=training,
        fold_report=report.record(),
        bn_nodes={"folded": bn_folded, "unfolded": bn_unfolded},
        parity=Parity(
            max_abs_diff=diff_fu,
            max_abs_diff_vs_torch={"folded": diff_ft, "unfolded": diff_ut},
            atol=atol,
            samples=len(x),
            inputs=x_kind,
        ),
        reference=ReferenceBatch(
            inputs={INPUT_NAME: TensorData.of(ref_x)},
            outputs={OUTPUT_NAME: TensorData.of(ref_y)},
            atol=max(atol, 1e-5),
        ),
    )
    return folded_bytes, unfolded_bytes, metadata, report


def int8_version(
    run: Run, folded: bytes, metadata: VersionMetadata, options: Int8Options
) -> tuple[bytes, VersionMetadata]:
    """``model.int8.onnx`` of a run's folded model, and the metadata that records it:
    calibrated on the run's training split, the method chosen on its validation split,
    accuracy measured on its test split. Raises :class:`ExportError` (nothing written)."""
    if metadata.inputs[0].datatype != "FP32":
        raise ExportError("--int8 quantizes a float32 export; drop --dtype float16")
    try:
        ds = run_dataset(run)
    except (KeyError, ValueError, OSError) as err:
        raise ExportError(f"--int8 needs the run's dataset to calibrate on: {err}") from err
    reference = metadata.reference.inputs[INPUT_NAME].array()
    try:
        data, record = build_int8(
            folded,
            (INPUT_NAME, OUTPUT_NAME),
            Samples(ds.X_train, ds.y_train, "samples of the run's training split"),
            Samples(ds.X_val, ds.y_val, "samples of the run's validation split"),
            Samples(ds.X_test, ds.y_test, "samples of the run's test split"),
            reference,
            options,
        )
    except Int8Error as err:
        raise ExportError(str(err)) from err
    files = metadata.files.model_copy(update={"int8": INT8_FILE})
    return data, metadata.model_copy(update={"files": files, "int8": record})


def export_run(
    run_dir: str | Path | Run,
    repository: str | Path,
    name: str,
    dtype: torch.dtype = torch.float32,
    int8: Int8Options | None = None,
) -> ExportResult:
    """Export a run as the next version of ``repository/name``; with ``int8``, also its
    ``model.int8.onnx`` (:func:`int8_version`). Raises :class:`ExportError`."""
    if not valid_model_name(name):
        raise ExportError(
            f"bad model name {name!r}: use letters, digits, '_', '-', '.' (not starting with '.')"
        )
    run = run_dir if isinstance(run_dir, Run) else load_run(run_dir)
    folded, unfolded, metadata, report = build_version(run, name, dtype)
    model_dir = Path(repository) / name
    files = {FOLDED_FILE: folded, UNFOLDED_FILE: unfolded}
    if int8 is not None:
        files[INT8_FILE], metadata = int8_version(run, folded, metadata, int8)
    try:
        version = write_version(model_dir, files, metadata)
    except ModelVersionError as err:
        raise ExportError(str(err)) from err
    log.debug("exported %s version %d to %s", name, version, model_dir / str(version))
    written = VersionMetadata.read(model_dir / str(version))
    return ExportResult(model_dir / str(version), version, written, report)
