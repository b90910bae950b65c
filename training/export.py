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
import hashlib
import json
import logging
import os
import shutil
import tempfile
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

from service.bn_graph import batchnorm_nodes
from training.data import load_dataset
from training.fold import FoldReport, fold_batchnorm
from training.onnx_graph import export_onnx
from training.train import Run, load_run
from training.zoo import count_batchnorms

log = logging.getLogger(__name__)

FOLDED_FILE = "model.onnx"
UNFOLDED_FILE = "model.unfolded.onnx"
METADATA_FILE = "metadata.json"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
V2_DATATYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float64): "FP64",
}
ATOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.float64: 1e-8}


class ExportError(RuntimeError):
    """An export that failed one of its own checks; nothing was written."""


@dataclass
class ExportResult:
    path: Path  # the version directory
    version: int
    metadata: dict[str, Any]
    report: FoldReport


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def existing_versions(model_dir: Path) -> list[int]:
    """Complete versions: directories named by a positive integer."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    )


def reference_inputs(run: Run, n: int, seed: int = 0) -> np.ndarray:
    """Real test samples when the run's dataset can be rebuilt, else seeded noise."""
    spec = run.config.get("dataset", {})
    try:
        kwargs: dict[str, Any] = {"seed": spec.get("seed", 0)}
        if spec.get("name") == "synthetic":
            kwargs.update(
                shape=tuple(spec["shape"]),
                num_classes=spec["num_classes"],
                n_samples=spec["n_samples"],
            )
        ds = load_dataset(
            spec["name"], path=spec.get("path"), label_column=spec.get("label_column"), **kwargs
        )
        if len(ds.X_test) >= n:
            return ds.X_test[:n]
    except (KeyError, ValueError, OSError) as err:
        log.info("dataset of %s not rebuildable (%s): reference batch is random", run.path, err)
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *run.model_cfg.input_shape)).astype(np.float32)


def ort_outputs(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    out = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return np.asarray(out)


def _tensor_json(a: np.ndarray) -> dict[str, Any]:
    return {
        "datatype": V2_DATATYPES[a.dtype],
        "shape": list(a.shape),
        "data": a.reshape(-1).tolist(),
    }


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
    parity_size: int = 64,
) -> tuple[bytes, bytes, dict[str, Any], FoldReport]:
    """Fold, export both variants, check them; return the two files and the metadata."""
    base: nn.Module = run.model.eval()
    x_all = reference_inputs(run, parity_size)  # (P, *input_shape) float32
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
    atol = ATOL[dtype]
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
    metadata: dict[str, Any] = {
        "format": "foldserve-model/1",
        "name": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "framework": {
            **_framework(),
            "opset": next(
                o.version for o in folded_proto.opset_import if o.domain in ("", "ai.onnx")
            ),
        },
        "files": {"folded": FOLDED_FILE, "unfolded": UNFOLDED_FILE},
        "inputs": [
            {
                "name": INPUT_NAME,
                "datatype": V2_DATATYPES[np_dtype],
                "shape": [-1, *run.model_cfg.input_shape],
            }
        ],
        "outputs": [
            {
                "name": OUTPUT_NAME,
                "datatype": V2_DATATYPES[np_dtype],
                "shape": [-1, run.model_cfg.num_classes],
            }
        ],
        "labels": run.labels,
        "model_config": run.model_cfg.to_dict(),
        "training": training,
        "fold_report": report.to_dict(),
        "bn_nodes": {"folded": bn_folded, "unfolded": bn_unfolded},
        "parity": {
            "max_abs_diff": diff_fu,
            "max_abs_diff_vs_torch": {"folded": diff_ft, "unfolded": diff_ut},
            "atol": atol,
            "samples": len(x),
        },
        "reference": {
            "inputs": {INPUT_NAME: _tensor_json(ref_x)},
            "outputs": {OUTPUT_NAME: _tensor_json(ref_y)},
            "atol": max(atol, 1e-5),
        },
    }
    return folded_bytes, unfolded_bytes, metadata, report


def write_version(model_dir: Path, files: dict[str, bytes], metadata: dict[str, Any]) -> int:
    """Write files into a temp directory, then rename it to the next free version number."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=model_dir))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; servers may run as another user
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        metadata["sha256"] = {fname: sha256_file(tmp / fname) for fname in files}
        for attempt in range(100):
            version = (existing_versions(model_dir) or [0])[-1] + 1
            metadata["version"] = version
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
            fd = os.open(tmp / METADATA_FILE, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            try:
                os.rename(tmp, model_dir / str(version))  # atomic; fails if it exists
                return version
            except OSError:
                log.debug("version %d taken by a concurrent export (attempt %d)", version, attempt)
        raise ExportError(f"could not claim a version number in {model_dir}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_run(
    run_dir: str | Path | Run,
    repository: str | Path,
    name: str,
    dtype: torch.dtype = torch.float32,
) -> ExportResult:
    """Export a run as the next version of ``repository/name``. Raises :class:`ExportError`."""
    if not name or not all(c.isalnum() or c in "_-." for c in name) or name.startswith("."):
        raise ExportError(f"bad model name {name!r}: use letters, digits, '_', '-', '.'")
    run = run_dir if isinstance(run_dir, Run) else load_run(run_dir)
    folded, unfolded, metadata, report = build_version(run, name, dtype)
    model_dir = Path(repository) / name
    version = write_version(model_dir, {FOLDED_FILE: folded, UNFOLDED_FILE: unfolded}, metadata)
    log.info("exported %s version %d to %s", name, version, model_dir / str(version))
    return ExportResult(model_dir / str(version), version, metadata, report)
