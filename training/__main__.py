"""``python -m training``: train, list-models, fold, export, retrain, bench-torch, experiment,
fold-onnx, import-onnx."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from training.data import DatasetError, load_dataset, parse_shape
from training.distributed import DistributedError, init_distributed, shutdown_distributed
from training.import_onnx import import_onnx_cmd
from training.onnx_cli import fold_onnx_cmd
from training.terminal import console, fail
from training.train import DatasetSpec, Run, RunError, TrainConfig, load_run, save_run, train
from training.zoo import (
    MODEL_DESCRIPTIONS,
    ModelConfig,
    ZooError,
    build_model,
    count_batchnorms,
    count_parameters,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train BN networks, fold BN, export folded and unfolded ONNX.",
)
log = logging.getLogger("training")
app.command("fold-onnx")(fold_onnx_cmd)
app.command("import-onnx")(import_onnx_cmd)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


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
        table.add_row(
            name,
            desc,
            f"{count_parameters(bn):,}",
            f"{count_parameters(plain):,}",
            str(count_batchnorms(bn)),
        )
    console.print(table)


@app.command("train")
def train_cmd(
    model: Annotated[str, typer.Option(help="zoo model: mlp, cnn, resnet, mobilenet")] = "cnn",
    dataset: Annotated[
        str, typer.Option(help="digits, breast_cancer, wine, synthetic, file")
    ] = "digits",
    out: Annotated[Path, typer.Option(help="run directory to write")] = Path("runs/digits_cnn"),
    data: Annotated[Path | None, typer.Option(help=".npz (X, y) or .csv user data")] = None,
    label_column: Annotated[str | None, typer.Option(help="label column of a CSV")] = None,
    shape: Annotated[str, typer.Option(help="synthetic input shape, e.g. 3x32x32")] = "3x32x32",
    num_classes: Annotated[int, typer.Option(help="synthetic classes")] = 10,
    n_samples: Annotated[int, typer.Option(help="synthetic samples")] = 2000,
    norm: Annotated[
        bool, typer.Option("--norm/--no-norm", help="BN model or its no-BN twin")
    ] = True,
    bn_position: Annotated[
        str, typer.Option(help="BN 'before' or 'after' the activation")
    ] = "before",
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
    distributed: Annotated[
        bool,
        typer.Option(
            help="one of torchrun's processes: DDP, gloo on CPU, NCCL on GPU; "
            "--batch-size is the global batch"
        ),
    ] = False,
    sync_bn: Annotated[
        bool,
        typer.Option(
            "--sync-bn/--no-sync-bn",
            help="with --distributed: BN statistics over the global batch (SyncBatchNorm)",
        ),
    ] = True,
) -> None:
    """Train a zoo model and write model.pt, config.json and metrics.json to --out.

    Under torchrun with --distributed, every process trains and rank 0 alone
    writes the run directory, which exports like any other.
    """
    if optimizer not in ("sgd", "adamw"):
        fail(f"unknown optimizer {optimizer!r}; choose sgd or adamw")
    if schedule not in ("cosine", "constant"):
        fail(f"unknown schedule {schedule!r}; choose cosine or constant")
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
        mcfg = ModelConfig(
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
    tcfg = TrainConfig(
        optimizer=optimizer,  # type: ignore[arg-type]
        lr=lr,
        schedule=schedule,  # type: ignore[arg-type]
        epochs=epochs,
        batch_size=batch_size,
        weight_decay=weight_decay,
        seed=seed,
        device=device,
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
    save_run(out, result, mcfg, spec, tcfg, ds.labels)
    m = result.metrics
    console.print(
        f"{model} on {ds.name}: test_accuracy={m['test_accuracy']:.4f} "
        f"val_accuracy={m['val_accuracy']:.4f} epochs={m['epochs']} "
        f"seconds={m['seconds']:.1f} -> {out}",
        highlight=False,
    )


def _load(run: Path) -> Run:
    try:
        return load_run(run)
    except RunError as err:
        fail(str(err))
        raise  # unreachable: fail() exits


RunOption = Annotated[Path, typer.Option("--run", help="run directory written by `train`")]


@app.command("fold")
def fold_cmd(run: RunOption) -> None:
    """Fold the run's BN layers and print the fold report (what was folded, what was kept)."""
    from training.fold import fold_batchnorm

    r = _load(run)
    x = torch.zeros((2, *r.model_cfg.input_shape))
    folded, report = fold_batchnorm(r.model, x)
    console.print(report.table())
    with torch.no_grad():
        xr = torch.randn((64, *r.model_cfg.input_shape))
        diff = float((folded(xr) - r.model(xr)).abs().max())
    console.print(f"max abs diff folded vs unfolded (64 random inputs): {diff:.3g}")


@app.command("export")
def export_cmd(
    run: RunOption,
    repository: Annotated[Path, typer.Option(help="model repository root")] = Path("models"),
    name: Annotated[str, typer.Option(help="model name in the repository")] = "",
    dtype: Annotated[str, typer.Option(help="float32 or float16")] = "float32",
) -> None:
    """Export folded and unfolded ONNX with metadata as the next version of --name."""
    from training.export import ExportError, export_run

    dtypes = {"float32": torch.float32, "float16": torch.float16}
    if dtype not in dtypes:
        fail(f"unknown dtype {dtype!r}; choose {', '.join(dtypes)}")
    try:
        result = export_run(_load(run), repository, name or run.name, dtypes[dtype])
    except ExportError as err:
        fail(str(err))
        return
    md = result.metadata
    parity = md.parity.max_abs_diff if md.parity is not None else float("nan")
    console.print(result.report.table())
    console.print(
        f"wrote {result.path}: BN nodes folded={md.bn_nodes['folded']} "
        f"unfolded={md.bn_nodes['unfolded']}, max abs diff folded vs unfolded {parity:.3g}",
        highlight=False,
    )


@app.command("retrain")
def retrain_cmd(
    name: Annotated[str, typer.Option(help="model name in the repository")],
    repository: Annotated[Path, typer.Option(help="model repository root")] = Path("models"),
    epochs: Annotated[int | None, typer.Option(min=1, help="instead of the recorded ones")] = None,
    seed: Annotated[
        int | None, typer.Option(help="instead of the recorded seed (data split and training)")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help=".npz or .csv file instead of the recorded dataset")
    ] = None,
    runs: Annotated[Path, typer.Option(help="directory the new run is saved in")] = Path("runs"),
    load: Annotated[
        str | None,
        typer.Option(help="then have this running server serve it, e.g. http://127.0.0.1:8000"),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="FOLDSERVE_API_KEY", help="the server's API key")
    ] = None,
) -> None:
    """Retrain --name with the configuration its latest version recorded; export the next
    version; with --load, have a running server serve it on every worker."""
    from training.export import ExportError, export_run
    from training.retrain import RetrainError, plan_retrain, train_plan
    from training.server import LoadError, check_live, load_version

    try:
        plan = plan_retrain(repository, name, epochs=epochs, seed=seed, data=data)
        if load is not None:
            check_live(load)  # before training, not after it
        t, d = plan.train, plan.dataset
        console.print(
            f"retraining {name} v{plan.base_version}: {plan.model.name} on "
            f"{d.path or d.name}, epochs={t.epochs} seed={t.seed} {t.optimizer} lr={t.lr:g}",
            highlight=False,
            soft_wrap=True,
        )
        run_dir = runs / f"{name}-v{plan.base_version + 1}"
        m = train_plan(plan, run_dir).metrics
        console.print(
            f"trained: test_accuracy={m['test_accuracy']:.4f} val_accuracy="
            f"{m['val_accuracy']:.4f} in {m['seconds']:.1f} s -> {run_dir}",
            highlight=False,
            soft_wrap=True,
        )
        with console.status(f"exporting {name} (fold, ONNX, parity checks)"):
            result = export_run(run_dir, repository, name, plan.dtype)
    except (RetrainError, DatasetError, ExportError, LoadError) as err:
        fail(str(err))
        return
    md = result.metadata
    console.print(
        f"wrote {result.path}: test_accuracy={md.training['test_accuracy']:.4f}, BN nodes "
        f"{md.bn_nodes['unfolded']} -> {md.bn_nodes['folded']}",
        highlight=False,
        soft_wrap=True,
    )
    if load is None:
        return
    try:
        with console.status(f"{load}: loading {name} v{result.version} in every worker"):
            served = load_version(load, name, result.version, api_key)
    except LoadError as err:
        fail(str(err))
        return
    console.print(
        f"{load} serves {name} version {served.version} on all {served.workers} workers "
        f"(ready: {', '.join(map(str, served.ready))})",
        highlight=False,
        soft_wrap=True,
    )


@app.command("bench-torch")
def bench_torch_cmd(
    run: RunOption,
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 8,
    iterations: Annotated[int, typer.Option(min=10, max=100000)] = 200,
    warmup: Annotated[int, typer.Option(min=0, max=10000)] = 20,
) -> None:
    """Eager PyTorch latency, folded vs unfolded, interleaved, on CPU (and CUDA if present)."""
    from training.bench_torch import bench_table

    r = _load(run)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    console.print(
        bench_table(r.model, r.model_cfg.input_shape, devices, batch_size, iterations, warmup)
    )


@app.command("defaults")
def defaults_cmd(
    repository: Annotated[Path, typer.Option()] = Path("models"),
    runs: Annotated[Path, typer.Option()] = Path("runs"),
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


@app.command("experiment")
def experiment_cmd(
    names: Annotated[list[str], typer.Argument(help="experiment names, or 'all'")],
    quick: Annotated[bool, typer.Option(help="seconds-long smoke run")] = False,
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
