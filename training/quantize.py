"""INT8 after folding: ONNX Runtime static quantization (QDQ) of a folded model, checked.

Per-channel INT8 weights are right only once BN's scale is inside them, which is
why quantization comes after folding (PyTorch's ``fuse_modules`` before
``prepare``, TensorRT, NNCF and AIMET all do the same). :func:`build_int8`
quantizes a folded FP32 model with each calibration method asked for, keeps the
one that does best on the selection data (accuracy, then agreement with FP32),
measures it on the evaluation data beside the FP32 model, and refuses it
(:class:`Int8Error`) when it loses more than the tolerance. The record it returns
is ``metadata.json``'s ``int8`` (:class:`foldserve.model_format.Int8Record`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from foldserve.model_format import Calibration, Int8Record, TensorData
from foldserve.model_graph import QDQ_OPS, op_counts

log = logging.getLogger(__name__)

_METHODS = (CalibrationMethod.MinMax, CalibrationMethod.Percentile, CalibrationMethod.Entropy)
METHODS = {m.name: m for m in _METHODS}  # the calibration methods export chooses from
CALIBRATION_SAMPLES = 256
CALIBRATION_BATCH = 32
TOLERANCE = 0.01  # accuracy loss allowed: 1 point
REFERENCE_STEPS = 4  # reference_atol: this many 8-bit steps of the reference outputs' range


class Int8Error(ValueError):
    """The INT8 model was not made or missed its tolerance; nothing was written."""


@dataclass(frozen=True)
class Int8Options:
    """``export --int8``: calibration sample size, methods to choose from, tolerance."""

    calibration_samples: int = CALIBRATION_SAMPLES
    methods: tuple[str, ...] = tuple(METHODS)
    tolerance: float = TOLERANCE  # accuracy loss allowed, as a fraction (0.01 = 1 point)
    seed: int = 0
    preprocess: bool = True  # ORT's quant_pre_process on the folded model first


@dataclass(frozen=True)
class Samples:
    """Inputs (``(N, *input_shape)``), their labels (None: unlabelled) and what they are."""

    x: np.ndarray
    y: np.ndarray | None
    what: str


class CalibrationBatches(CalibrationDataReader):  # type: ignore[misc]  # ORT's class is untyped
    """ONNX Runtime's calibration reader over ``x``, ``CALIBRATION_BATCH`` rows at a time."""

    def __init__(self, input_name: str, x: np.ndarray) -> None:
        self._feeds = iter(
            {input_name: x[i : i + CALIBRATION_BATCH]} for i in range(0, len(x), CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def calibration_sample(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` rows of ``x``, drawn without replacement (seeded), a whole number of
    calibration batches when there are more than one (ORT's histogram calibrators fail
    on batches of unequal size)."""
    rng = np.random.default_rng(seed)
    n = min(n, len(x))
    if n > CALIBRATION_BATCH:
        n -= n % CALIBRATION_BATCH
    return x[np.sort(rng.permutation(len(x))[:n])]


def preprocess(model: bytes) -> bytes | None:
    """ONNX Runtime's quantization pre-processing (``quant_pre_process``: shape inference
    and ORT's basic graph optimizations, which fuse e.g. a Pad into its Conv); None when
    it fails on this graph (then quantize the file as it is)."""
    with tempfile.TemporaryDirectory(prefix="foldserve-int8-") as tmp:
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        source.write_bytes(model)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quant_pre_process(source, target)
            return target.read_bytes()
        except Exception as err:  # ORT's and onnx's own errors, many kinds: quantize as is
            log.info("quantization pre-processing failed (%s): quantizing the file as it is", err)
            return None


def quantize_qdq(
    model: bytes, input_name: str, calibration: np.ndarray, method: str, per_channel: bool = True
) -> bytes:
    """Static QDQ quantization: INT8 weights (per output channel when ``per_channel``) in
    a 7-bit range, UINT8 activations calibrated with ``method`` on ``calibration``.

    UINT8 activations with 7-bit weights (``reduce_range``), chosen by measurement on
    an AVX2 machine without VNNI (``bench/int8_kernels.py``): U8S8 with 8-bit weights
    loses test accuracy (ORT's AVX2 U8S8 kernels saturate their 16-bit pair sums),
    with 7-bit weights it does not and runs as fast; S8S8 and U8U8 keep the accuracy
    but are slower than FP32. 7-bit weights cost a VNNI machine a little precision
    and no speed, so the file is the same for both (docs/folding.md has the numbers).
    """
    if method not in METHODS:
        raise Int8Error(f"unknown calibration method {method!r}; choose {', '.join(METHODS)}")
    with tempfile.TemporaryDirectory(prefix="foldserve-int8-") as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(model)
        # ORT prints calibration progress and warns on the root logger: keep both quiet.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    source,
                    target,
                    CalibrationBatches(input_name, calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    reduce_range=True,
                    calibrate_method=METHODS[method],
                )
        finally:
            root.setLevel(level)
        return target.read_bytes()


def run_model(model: bytes, input_name: str, x: np.ndarray) -> np.ndarray:
    """The first output of ``model`` on ``x``, ONNX Runtime CPU, one thread."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {input_name: x})[0])


def _accuracy(logits: np.ndarray, y: np.ndarray | None) -> float | None:
    return None if y is None else float((logits.argmax(axis=1) == y).mean())


def _score(int8: np.ndarray, fp32: np.ndarray, y: np.ndarray | None) -> float:
    """Accuracy when labelled, else argmax agreement with FP32: what selection maximizes."""
    acc = _accuracy(int8, y)
    return float((int8.argmax(axis=1) == fp32.argmax(axis=1)).mean()) if acc is None else acc


def build_int8(
    folded: bytes,
    names: tuple[str, str],
    calibration: Samples,
    selection: Samples,
    evaluation: Samples,
    reference_inputs: np.ndarray,
    options: Int8Options,
) -> tuple[bytes, Int8Record]:
    """Pre-process ``folded`` (:func:`preprocess`), quantize it, choose the calibration
    method, check it; the file and its record.

    ``names`` are the input and output names. The methods are scored on ``selection``
    (the validation split for a run), the chosen model is measured on ``evaluation``
    (its test split) beside ``folded``. Raises :class:`Int8Error` when the INT8 model
    loses more than ``options.tolerance`` of accuracy (of argmax agreement with FP32
    when ``evaluation`` has no labels), saying by how much it missed.
    """
    input_name, output_name = names
    source = preprocess(folded) if options.preprocess else None
    model = folded if source is None else source  # what is quantized
    cal = calibration_sample(calibration.x, options.calibration_samples, options.seed)
    if len(cal) == 0:
        raise Int8Error(f"no calibration samples in {calibration.what}")
    fp32_sel = run_model(folded, input_name, selection.x)
    candidates: dict[str, float] = {}
    models: dict[str, bytes] = {}
    for method in options.methods:
        models[method] = quantize_qdq(model, input_name, cal, method)
        scored = run_model(models[method], input_name, selection.x)
        candidates[method] = _score(scored, fp32_sel, selection.y)
    # The best score; ties go to the earlier method in options.methods (MinMax: the cheapest).
    method = max(options.methods, key=lambda m: candidates[m])
    int8 = models[method]
    fp32_eval = run_model(folded, input_name, evaluation.x)
    int8_eval = run_model(int8, input_name, evaluation.x)
    accuracy, reference = _accuracy(int8_eval, evaluation.y), _accuracy(fp32_eval, evaluation.y)
    agreement = float((int8_eval.argmax(axis=1) == fp32_eval.argmax(axis=1)).mean())
    loss = (1.0 - agreement) if accuracy is None or reference is None else reference - accuracy
    what = "accuracy" if accuracy is not None else "argmax agreement with FP32"
    if loss > options.tolerance:
        got = (
            f"agreement {agreement:.4f}"
            if accuracy is None or reference is None
            else f"{accuracy:.4f} against FP32's {reference:.4f}"
        )
        raise Int8Error(
            f"INT8 loses {loss * 100:.2f} points of {what} ({got} on {len(evaluation.x)} "
            f"{evaluation.what}); the tolerance is {options.tolerance * 100:g} point(s), "
            f"missed by {(loss - options.tolerance) * 100:.2f}: no INT8 file written "
            "(--int8-tolerance sets the tolerance)"
        )
    per_tensor_model = quantize_qdq(model, input_name, cal, method, per_channel=False)
    per_tensor = run_model(per_tensor_model, input_name, evaluation.x)
    per_tensor_acc = _accuracy(per_tensor, evaluation.y)
    per_tensor_loss = (
        1.0 - float((per_tensor.argmax(axis=1) == fp32_eval.argmax(axis=1)).mean())
        if per_tensor_acc is None or reference is None
        else reference - per_tensor_acc
    )
    ref_fp32 = run_model(folded, input_name, reference_inputs)
    ref_int8 = run_model(int8, input_name, reference_inputs)
    spread = float(ref_int8.max() - ref_int8.min()) if ref_int8.size else 0.0
    record = Int8Record(
        calibration=Calibration(
            method=method,
            samples=len(cal),
            inputs=calibration.what,
            chosen_by=f"best {'accuracy' if selection.y is not None else 'FP32 agreement'} "
            f"on {len(selection.x)} {selection.what}",
            candidates=candidates,
        ),
        accuracy=accuracy,
        reference_accuracy=reference,
        accuracy_samples=len(evaluation.x),
        accuracy_inputs=evaluation.what,
        agreement=agreement,
        tolerance=options.tolerance,
        max_abs_diff=float(np.abs(ref_int8.astype(np.float64) - ref_fp32).max(initial=0.0)),
        per_tensor_accuracy=per_tensor_acc,
        per_channel_needed=per_tensor_loss > options.tolerance,
        preprocessed=source is not None,
        qdq_nodes=op_counts(onnx.load_model_from_string(int8), QDQ_OPS),
        reference_outputs={output_name: TensorData.of(ref_int8)},
        reference_atol=max(1e-4, REFERENCE_STEPS * spread / 255),
    )
    log.debug("int8: %s", record.model_dump(exclude={"reference_outputs"}))
    return int8, record


def summary(record: Int8Record) -> list[str]:
    """The INT8 report in lines, for the CLI."""
    cal = record.calibration
    tried = ", ".join(f"{m} {v:.4f}" for m, v in cal.candidates.items())
    if record.accuracy is not None and record.reference_accuracy is not None:
        acc = (
            f"accuracy {record.accuracy:.4f} against FP32 folded {record.reference_accuracy:.4f}"
            f" ({(record.accuracy - record.reference_accuracy) * 100:+.2f} points)"
        )
    else:
        acc = "no labels: accuracy not measured"
    per_tensor = (
        f"per-tensor weights would reach {record.per_tensor_accuracy:.4f}"
        if record.per_tensor_accuracy is not None
        else "per-tensor weights measured by FP32 agreement"
    )
    needed = "needed" if record.per_channel_needed else "not needed here"
    pre = "folded model pre-processed by ORT, " if record.preprocessed else ""
    return [
        f"int8 ({pre}QDQ, per-channel INT8 weights in 7 bits, UINT8 activations): {acc} on "
        f"{record.accuracy_samples} {record.accuracy_inputs}; argmax agreement with FP32 "
        f"{record.agreement:.4f}; tolerance {record.tolerance * 100:g} point(s)",
        f"int8 calibration: {cal.method} on {cal.samples} {cal.inputs} ({cal.chosen_by}: {tried})",
        f"int8 per-channel: {per_tensor}, so per-channel quantization was {needed}; "
        f"max abs diff against FP32 on the reference batch {record.max_abs_diff:.3g}",
    ]


def parse_methods(text: str) -> tuple[str, ...]:
    """``"MinMax,Entropy"`` -> the methods, in order; :class:`Int8Error` for unknown ones."""
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise Int8Error(
            f"unknown calibration method(s) {unknown or [text]}; choose from {', '.join(METHODS)}"
        )
    return methods
