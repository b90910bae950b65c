"""``python -m training retrain``: train a model again with what its latest version recorded
(or with overrides), export the next version, and with ``--load`` have a running server
serve it on every worker. The work is :mod:`training.retrain`'s; this is the command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from training import int8_cli as q
from training.terminal import console, fail


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
    from training.data import DatasetError
    from training.export import ExportError, export_run
    from training.retrain import RetrainError, plan_retrain, train_plan
    from training.server_client import LoadError, check_live, load_version

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
            result = export_run(run_dir, repository, name, plan.dtype, plan.int8)
    except (RetrainError, DatasetError, ExportError, LoadError) as err:
        fail(str(err))
        return
    md = result.metadata
    q.print_int8(md.int8)
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
