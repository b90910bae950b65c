"""The ``--int8`` options of ``export`` and ``import-onnx``, and how the CLI prints the result."""

from __future__ import annotations

from typing import Annotated

import typer

from foldserve.model_format import Int8Record
from training.quantize import CALIBRATION_SAMPLES, METHODS, Int8Error, Int8Options, parse_methods
from training.terminal import console, fail

Int8Option = Annotated[
    bool,
    typer.Option(
        "--int8",
        metavar="",
        help="also write model.int8.onnx: static INT8 (QDQ) of the folded model, calibrated "
        "and checked against FP32 accuracy",
    ),
]
Int8ToleranceOption = Annotated[
    float,
    typer.Option(
        min=0.0, max=100.0, help="with --int8: accuracy points INT8 may lose before it is refused"
    ),
]
CalibrationSamplesOption = Annotated[
    int, typer.Option(min=1, max=100_000, help="with --int8: samples to calibrate on")
]
CalibrationMethodOption = Annotated[
    str,
    typer.Option(
        help="with --int8: calibration methods to choose from by measured accuracy, "
        f"comma-separated ({', '.join(METHODS)})"
    ),
]
DEFAULT_METHODS = ",".join(METHODS)
DEFAULT_TOLERANCE = 1.0
DEFAULT_SAMPLES = CALIBRATION_SAMPLES


def int8_options(int8: bool, tolerance: float, samples: int, methods: str) -> Int8Options | None:
    """The options the flags ask for; None without ``--int8`` (exits on a bad method)."""
    if not int8:
        return None
    try:
        chosen = parse_methods(methods)
    except Int8Error as err:
        fail(str(err))
        raise  # unreachable: fail() exits
    return Int8Options(calibration_samples=samples, methods=chosen, tolerance=tolerance / 100)


def options_of(record: Int8Record) -> Int8Options:
    """What a version's INT8 was made with: ``retrain`` makes the next one the same way."""
    methods = tuple(m for m in record.calibration.candidates if m in METHODS)
    return Int8Options(
        calibration_samples=record.calibration.samples,
        methods=methods or tuple(METHODS),
        tolerance=record.tolerance,
    )


def print_int8(record: Int8Record | None) -> None:
    if record is None:
        return
    from training.quantize import summary

    for line in summary(record):
        console.print(line, highlight=False, soft_wrap=True, markup=False)
