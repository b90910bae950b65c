"""``python -m training``: train, list-models, fold, export, retrain, bench-torch, experiment,
fold-onnx, import-onnx.

torch and scikit-learn are imported by the commands that use them, not here: ``--help``
(and ``foldserve --help-training``) answer without them, in well under a second.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from training import int8_cli as q
from training import train_options as opts
from training.cli_support import ExperimentCommand, configure_logging, new_run_dir
from training.import_onnx import import_onnx_cmd
from training.onnx_cli import fold_onnx_cmd
from training.retrain_cli import retrain_cmd
from training.terminal import console, fail

if TYPE_CHECKING:
    from training.train import Run

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train BN networks, fold BN, export folded and unfolded ONNX.",
)
log = logging.getLogger("training")
app.command("fold-onnx")(fold_onnx_cmd)
app.command("import-onnx")(import_onnx_cmd)


@app.callback()
def main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            metavar="",
            help="debug logs, and the INFO logs of torch's ONNX exporter (onnxscript, onnx_ir)",
        ),
    ] = False,
) -> None:
    configure_logging(verbose)


@app.command("list-models")
def list_models(
    input_shape: Annotated[str, typer.Option(help="input shape, e.g. 1x8x8 or 30")] = "1x8x8",
    num_classes: Annotated[int, typer.Option(help="output classes")] = 10,
) -> None:
    """Show the zoo with parameter counts (BN model and its no-BN twin)."""
    from training.cli_support import zoo_table
    from training.data import parse_shape

    console.print(zoo_table(parse_shape(input_shape), num_classes))


@app.command("train")
def train_cmd(
    model: opts.ModelOption = "cnn",
    dataset: opts.DatasetOption = "digits",
    out: opts.OutOption = None,
    force: opts.ForceOption = False,
    data: opts.DataOption = None,
    label_column: opts.LabelColumnOption = None,
    shape: opts.ShapeOption = "3x32x32",
    num_classes: opts.NumClassesOption = 10,
    n_samples: opts.NSamplesOption = 2000,
    norm: opts.NormOption = True,
    bn_position: opts.BnPositionOption = "before",
    depth: opts.DepthOption = None,
    width: opts.WidthOption = None,
    activation: opts.ActivationOption = "relu",
    dropout: opts.DropoutOption = 0.0,
    optimizer: opts.OptimizerOption = "adamw",
    lr: opts.LrOption = 3e-3,
    schedule: opts.ScheduleOption = "cosine",
    epochs: opts.EpochsOption = 10,
    batch_size: opts.BatchSizeOption = 64,
    weight_decay: opts.WeightDecayOption = 1e-4,
    seed: opts.SeedOption = 0,
    device: opts.DeviceOption = "auto",
    dtype: opts.DtypeOption = "float32",
    distributed: opts.DistributedOption = False,
    sync_bn: opts.SyncBnOption = True,
) -> None:
    """Train a zoo model and write model.pt, config.json and metrics.json to a run directory.

    Under torchrun with --distributed, every process trains and rank 0 alone
    writes the run directory, which exports like any other.
    """
    from training.data import DatasetError, load_dataset, parse_shape
    from training.distributed import DistributedError, init_distributed, shutdown_distributed
    from training.train import DatasetSpec, TrainConfig, save_run, train
    from training.zoo import NetworkConfig, ZooError, build_model

    if optimizer not in ("sgd", "adamw"):
        fail(f"unknown optimizer {optimizer!r}; choose sgd or adamw")
    if schedule not in ("cosine", "constant"):
        fail(f"unknown schedule {schedule!r}; choose cosine or constant")
    if dtype not in ("float32", "float64"):
        fail(f"unknown dtype {dtype!r}; choose float32 or float64")
    if epochs < 1 or batch_size < 2:
        fail("--epochs must be >= 1 and --batch-size >= 2 (BN needs 2+ samples per batch)")
    try:
        syn_shape = parse_shape(shape)
        ds = load_dataset(
            dataset,
            seed=seed,
            path=data,
            label_column=label_column,
            shape=syn_shape,
            num_classes=num_classes,
            n_samples=n_samples,
        )
        mcfg = NetworkConfig(
            model,
            ds.input_shape,
            ds.num_classes,
            norm=norm,
            bn_position=bn_position,  # type: ignore[arg-type]
            depth=depth,
            width=width,
            activation=activation,
            dropout=dropout,
        )
        build_model(mcfg)  # validate the architecture before training starts
    except (DatasetError, ZooError) as err:
        fail(str(err))
    if out is None:
        out = new_run_dir(Path("runs"), f"{ds.name}_{model}")
    elif (out / "config.json").exists() and not force:
        fail(f"{out} holds a run already: pass --force to overwrite it, or choose another --out")
    tcfg = TrainConfig(
        optimizer=optimizer,  # type: ignore[arg-type]
        lr=lr,
        schedule=schedule,  # type: ignore[arg-type]
        epochs=epochs,
        batch_size=batch_size,
        weight_decay=weight_decay,
        seed=seed,
        device=device,
        dtype=dtype,  # type: ignore[arg-type]
    )
    processes = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    if batch_size % processes or batch_size // processes < 2:
        fail(
            f"--batch-size {batch_size} is the global batch: it must split evenly into "
            f"{processes} processes, at least 2 samples each"
        )
    ctx = None
    if distributed:
        try:
            ctx = init_distributed(device, sync_batchnorm=sync_bn)
        except DistributedError as err:
            fail(str(err))
    try:
        result = train(mcfg, ds, tcfg, distributed=ctx)
    finally:
        if ctx is not None:
            shutdown_distributed()
    if ctx is not None and not ctx.is_main:
        return  # rank 0 alone writes the run directory
    spec = DatasetSpec(
        dataset if data is None else "file",
        seed,
        None if data is None else str(data),
        label_column,
        list(syn_shape) if dataset == "synthetic" else None,
        num_classes if dataset == "synthetic" else None,
        n_samples if dataset == "synthetic" else None,
    )
    save_run(out, result, mcfg, spec, tcfg, ds.labels, ds.features)
    m = result.metrics
    console.print(
        f"{model} on {ds.name}: test_accuracy={m['test_accuracy']:.4f} "
        f"val_accuracy={m['val_accuracy']:.4f} epochs={m['epochs']} "
        f"seconds={m['seconds']:.1f} -> {out}",
        highlight=False,
        soft_wrap=True,
    )


def _load(run: Path) -> Run:
    from training.train import RunError, load_run

    try:
        return load_run(run)
    except RunError as err:
        fail(str(err))
        raise  # unreachable: fail() exits


RunOption = Annotated[Path, typer.Option("--run", help="run directory written by `train`")]


@app.command("fold")
def fold_cmd(run: RunOption) -> None:
    """Fold the run's BN layers; print what went into which layer (types, shapes) or was
    kept and why, the spread of each folded layer's weights over its output channels,
    and the PyTorch parity check (exit 1 when it fails)."""
    import torch

    from training.export import torch_parity
    from training.fold import fold_batchnorm
    from training.fold.report import DIRECTIONS, RANGE_NOTE, channel_ranges

    r = _load(run)
    x = torch.zeros((2, *r.model_cfg.input_shape))
    folded, report = fold_batchnorm(r.model, x)
    console.print(report.table(channel_ranges(folded, report)))
    console.print(DIRECTIONS, highlight=False, soft_wrap=True)
    console.print(RANGE_NOTE, highlight=False, soft_wrap=True)
    parity = torch_parity(r, folded)
    console.print(parity.line(), highlight=False, soft_wrap=True)
    if not parity.passed:
        raise typer.Exit(1)


@app.command("export")
def export_cmd(
    run: RunOption,
    repository: Annotated[Path, typer.Option(help="model repository root")] = Path("models"),
    name: Annotated[
        str,
        typer.Option(
            help="model name in the repository (default: the run directory's name)",
            show_default=False,
        ),
    ] = "",
    dtype: Annotated[str, typer.Option(help="float32 or float16")] = "float32",
    int8: q.Int8Option = False,
    int8_tolerance: q.Int8ToleranceOption = q.DEFAULT_TOLERANCE,
    calibration_samples: q.CalibrationSamplesOption = q.DEFAULT_SAMPLES,
    calibration_method: q.CalibrationMethodOption = q.DEFAULT_METHODS,
) -> None:
    """Export folded and unfolded ONNX with metadata as the next version of --name;
    with --int8 also model.int8.onnx (calibrated on the run's training split)."""
    from training.export import EXPORT_DTYPES, ExportError, ParityCheck, export_run
    from training.fold.report import DIRECTIONS

    if dtype not in EXPORT_DTYPES:
        fail(f"unknown dtype {dtype!r}; choose {', '.join(EXPORT_DTYPES)}")
    quantize = q.int8_options(int8, int8_tolerance, calibration_samples, calibration_method)
    try:
        result = export_run(
            _load(run), repository, name or run.name, EXPORT_DTYPES[dtype], quantize
        )
    except ExportError as err:
        fail(str(err))
        return
    md = result.metadata
    console.print(result.report.table())
    console.print(DIRECTIONS, highlight=False, soft_wrap=True)
    if md.parity is not None:
        p = md.parity
        check = ParityCheck("ONNX Runtime", p.max_abs_diff, p.atol, p.samples, p.inputs)
        console.print(check.line(), highlight=False, soft_wrap=True)
    q.print_int8(md.int8)
    console.print(
        f"wrote {result.path}: BN nodes folded={md.bn_nodes['folded']} "
        f"unfolded={md.bn_nodes['unfolded']}",
        highlight=False,
        soft_wrap=True,
    )


app.command("retrain")(retrain_cmd)


@app.command("bench-torch")
def bench_torch_cmd(
    run: RunOption,
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="samples per call")] = 8,
    iterations: Annotated[
        int, typer.Option(min=10, max=100000, help="timed calls of each variant")
    ] = 200,
    warmup: Annotated[
        int, typer.Option(min=0, max=10000, help="untimed calls of each variant first")
    ] = 20,
) -> None:
    """Eager PyTorch latency, folded vs unfolded, interleaved, on CPU (and CUDA if present)."""
    import torch

    from training.bench_torch import bench_table

    r = _load(run)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    console.print(
        bench_table(r.model, r.model_cfg.input_shape, devices, batch_size, iterations, warmup)
    )


@app.command("defaults")
def defaults_cmd(
    repository: Annotated[Path, typer.Option(help="model repository root")] = Path("models"),
    runs: Annotated[Path, typer.Option(help="where the runs are kept (reused)")] = Path("runs"),
) -> None:
    """Train and export digits_cnn, breast_cancer_mlp and resnet_bench where missing."""
    from training.defaults import ensure_default_models

    for result in ensure_default_models(repository, runs):
        md = result.metadata
        console.print(
            f"{md.name} v{result.version}: test_accuracy="
            f"{md.training.get('test_accuracy', float('nan')):.4f}, BN nodes "
            f"{md.bn_nodes['unfolded']} -> {md.bn_nodes['folded']}",
            highlight=False,
        )


@app.command("experiment", cls=ExperimentCommand)
def experiment_cmd(
    names: Annotated[list[str], typer.Argument(help="experiment names (listed above), or 'all'")],
    quick: Annotated[
        bool, typer.Option("--quick", metavar="", help="seconds-long smoke run")
    ] = False,
    out: Annotated[Path, typer.Option(help="report directory")] = Path("docs"),
    seeds: Annotated[int | None, typer.Option(min=2, help="seeds per configuration")] = None,
) -> None:
    """Test BN's common claims against its no-BN twin; write the report, JSON and plots."""
    from training.experiments import ExperimentError, run_experiments

    try:
        report = run_experiments(names, quick=quick, out_dir=out, seeds=seeds, progress=True)
    except ExperimentError as err:
        fail(str(err))
        return
    console.print(f"wrote {report}", highlight=False)


if __name__ == "__main__":
    app()
