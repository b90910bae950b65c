"""The options of ``python -m training train``: each with its one-line help (and default
where the default needs words), kept apart from the command so it reads as a list."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelOption = Annotated[str, typer.Option(help="zoo model: mlp, cnn, resnet, mobilenet")]
DatasetOption = Annotated[str, typer.Option(help="digits, breast_cancer, wine, synthetic, file")]
OutOption = Annotated[
    Path | None,
    typer.Option(
        help="run directory to write (default: runs/<dataset>_<model>, or _2, _3... "
        "when that exists)",
        show_default=False,
    ),
]
ForceOption = Annotated[
    bool, typer.Option("--force", metavar="", help="overwrite an existing --out run")
]
DataOption = Annotated[
    Path | None,
    typer.Option(help=".npz (X, y) or .csv user data (sets --dataset to 'file')"),
]
LabelColumnOption = Annotated[
    str | None, typer.Option(help="label column of a CSV (required with a .csv --data)")
]
ShapeOption = Annotated[str, typer.Option(help="synthetic input shape, e.g. 3x32x32")]
NumClassesOption = Annotated[int, typer.Option(help="synthetic classes")]
NSamplesOption = Annotated[int, typer.Option(help="synthetic samples")]
NormOption = Annotated[
    bool, typer.Option("--norm/--no-norm", metavar="", help="BN model or its no-BN twin")
]
BnPositionOption = Annotated[str, typer.Option(help="BN 'before' or 'after' the activation")]
DepthOption = Annotated[
    int | None,
    typer.Option(help="hidden layers (mlp) or stages (default: mlp 2, cnn 2, resnet 3)"),
]
WidthOption = Annotated[
    int | None,
    typer.Option(help="hidden units (mlp) or first channels (default: 64, 32, 16)"),
]
ActivationOption = Annotated[str, typer.Option(help="relu, gelu, tanh or sigmoid")]
DropoutOption = Annotated[float, typer.Option(help="dropout probability after each block")]
OptimizerOption = Annotated[str, typer.Option(help="sgd or adamw")]
LrOption = Annotated[float, typer.Option(help="learning rate")]
ScheduleOption = Annotated[str, typer.Option(help="cosine or constant")]
EpochsOption = Annotated[int, typer.Option(help="passes over the training split")]
BatchSizeOption = Annotated[int, typer.Option(help="samples per training step")]
WeightDecayOption = Annotated[float, typer.Option(help="optimizer weight decay")]
SeedOption = Annotated[int, typer.Option(help="seed of the data split and of training")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda")]
DtypeOption = Annotated[
    str,
    typer.Option(
        help="training precision: float32, or float64 to compare runs beyond float32's rounding"
    ),
]
DistributedOption = Annotated[
    bool,
    typer.Option(
        "--distributed",
        metavar="",
        help="one of torchrun's processes: DDP, gloo on CPU, NCCL on GPU; "
        "--batch-size is the global batch",
    ),
]
SyncBnOption = Annotated[
    bool,
    typer.Option(
        "--sync-bn/--no-sync-bn",
        metavar="",
        help="with --distributed: BN statistics over the global batch (SyncBatchNorm)",
    ),
]
