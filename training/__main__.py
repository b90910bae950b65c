"""``python -m training``: train, list-models, fold, export, bench-torch, experiment."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from training.data import DatasetError, load_dataset, parse_shape
from training.train import DatasetSpec, RunError, TrainConfig, load_run, save_run, train
from training.zoo import (
    MODEL_DESCRIPTIONS,
    ModelConfig,
    ZooError,
    build_model,
    count_batchnorms,
    count_parameters,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train BN networks, fold BN, export folded and unfolded ONNX.")
console = Console()
log = logging.getLogger("training")


def fail(message: str) -> None:
    """One-line error, exit code 2 (no traceback for user mistakes)."""
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command("list-models")
def list_models(
    input_shape: Annotated[str, typer.Option(help="input shape, e.g. 1x8x8 or 30")] = "1x8x8",
    num_classes: Annotated[int, typer.Option()] = 10,
) -> None:
    """Show the zoo with parameter counts (BN model and its no-BN twin)."""
    shape = parse_shape(input_shape)
    table = Table(title=f"FoldServe zoo (input {input_shape}, {num_classes} classes)")
    for col in ("model", "description", "params (BN)", "params (no BN)", "BN layers"):
        table.add_column(col)
    for name, desc in MODEL_DESCRIPTIONS.items():
        if name != "mlp" and len(shape) != 3:
            table.add_row(name, desc, "-", "-", "needs CxHxW input")
            continue
        bn = build_model(ModelConfig(name, shape, num_classes))
        plain = build_model(ModelConfig(name, shape, num_classes, norm=False))
        table.add_row(name, desc, f"{count_parameters(bn):,}", f"{count_parameters(plain):,}",
                      str(count_batchnorms(bn)))
    console.print(table)


@app.command("train")
def train_cmd(
    model: Annotated[str, typer.Option(help="zoo model: mlp, cnn, resnet, mobilenet")] = "cnn",
    dataset: Annotated[str, typer.Option(help="digits, breast_cancer, wine, synthetic, file")] = "digits",
    out: Annotated[Path, typer.Option(help="run directory to write")] = Path("runs/digits_cnn"),
    data: Annotated[Path | None, typer.Option(help=".npz (X, y) or .csv user data")] = None,
    label_column: Annotated[str | None, typer.Option(help="label column of a CSV")] = None,
    shape: Annotated[str, typer.Option(help="synthetic input shape, e.g. 3x32x32")] = "3x32x32",
    num_classes: Annotated[int, typer.Option(help="synthetic classes")] = 10,
    n_samples: Annotated[int, typer.Option(help="synthetic samples")] = 2000,
    norm: Annotated[bool, typer.Option("--norm/--no-norm", help="BN model or its no-BN twin")] = True,
    bn_position: Annotated[str, typer.Option(help="BN 'before' or 'after' the activation")] = "before",
    depth: Annotated[int | None, typer.Option()] = None,
    width: Annotated[int | None, typer.Option()] = None,
    activation: Annotated[str, typer.Option()] = "relu",
    dropout: Annotated[float, typer.Option()] = 0.0,
    optimizer: Annotated[str, typer.Option(help="sgd or adamw")] = "adamw",
    lr: Annotated[float, typer.Option()] = 3e-3,
    schedule: Annotated[str, typer.Option(help="cosine or constant")] = "cosine",
    epochs: Annotated[int, typer.Option()] = 10,
    batch_size: Annotated[int, typer.Option()] = 64,
    weight_decay: Annotated[float, typer.Option()] = 1e-4,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Train a zoo model and write model.pt, config.json and metrics.json to --out."""
    if optimizer not in ("sgd", "adamw"):
        fail(f"unknown optimizer {optimizer!r}; choose sgd or adamw")
    if schedule not in ("cosine", "constant"):
        fail(f"unknown schedule {schedule!r}; choose cosine or constant")
    if epochs < 1 or batch_size < 2:
        fail("--epochs must be >= 1 and --batch-size >= 2 (BN needs 2+ samples per batch)")
    try:
        syn_shape = parse_shape(shape)
        ds = load_dataset(dataset, seed=seed, path=data, label_column=label_column,
                          shape=syn_shape, num_classes=num_classes, n_samples=n_samples)
        mcfg = ModelConfig(model, ds.input_shape, ds.num_classes, norm=norm,
                           bn_position=bn_position,  # type: ignore[arg-type]
                           depth=depth, width=width, activation=activation, dropout=dropout)
        build_model(mcfg)  # validate the architecture before training starts
    except (DatasetError, ZooError) as err:
        fail(str(err))
    tcfg = TrainConfig(optimizer=optimizer, lr=lr, schedule=schedule,  # type: ignore[arg-type]
                       epochs=epochs, batch_size=batch_size, weight_decay=weight_decay,
                       seed=seed, device=device)
    result = train(mcfg, ds, tcfg)
    spec = DatasetSpec(dataset if data is None else "file", seed,
                       None if data is None else str(data), label_column,
                       list(syn_shape) if dataset == "synthetic" else None,
                       num_classes if dataset == "synthetic" else None,
                       n_samples if dataset == "synthetic" else None)
    save_run(out, result, mcfg, spec, tcfg, ds.labels)
    m = result.metrics
    console.print(f"{model} on {ds.name}: test_accuracy={m['test_accuracy']:.4f} "
                  f"val_accuracy={m['val_accuracy']:.4f} epochs={m['epochs']} "
                  f"seconds={m['seconds']:.1f} -> {out}", highlight=False)


def _load(run: Path):  # type: ignore[no-untyped-def]
    try:
        return load_run(run)
    except RunError as err:
        fail(str(err))


if __name__ == "__main__":
    app()
