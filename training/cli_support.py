"""The training CLI's pieces that are not commands: what it shows (logging, help, the zoo
table) and where a run goes when no ``--out`` is given.

Kept out of ``training/__main__.py`` so the commands stay a list of options and calls.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rich.table import Table
from typer.core import TyperCommand

# Libraries that log one INFO line per pass while torch exports ONNX (dozens per export).
CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo", "torch.export")


def configure_logging(verbose: bool) -> None:
    """FoldServe's own INFO lines; the exporter's libraries at WARNING unless ``verbose``
    (then everything at DEBUG for ``training``, INFO for the libraries)."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("training").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def new_run_dir(runs: Path, stem: str) -> Path:
    """``runs/stem``, or the first of ``runs/stem_2``, ``runs/stem_3``... that does not exist:
    a run without ``--out`` never replaces another."""
    candidate, n = runs / stem, 1
    while candidate.exists():
        n += 1
        candidate = runs / f"{stem}_{n}"
    return candidate


class ExperimentCommand(TyperCommand):
    """``experiment --help`` lists the experiment names (imported only when help is shown:
    the experiments package pulls in plotting)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from training.experiments import EXPERIMENTS

        names = ", ".join(EXPERIMENTS)
        if self.help and names not in self.help:
            self.help = f"{self.help}\n\nExperiments: all, {names}."
        super().format_help(ctx, formatter)


def zoo_table(shape: tuple[int, ...], num_classes: int) -> Table:
    """The zoo's models with parameter counts (BN model and its no-BN twin) for ``shape``."""
    from training.zoo import (
        MODEL_DESCRIPTIONS,
        NetworkConfig,
        build_model,
        count_batchnorms,
        count_parameters,
    )

    table = Table(title=f"FoldServe zoo (input {'x'.join(map(str, shape))}, {num_classes} classes)")
    for col in ("model", "description", "params (BN)", "params (no BN)", "BN layers"):
        table.add_column(col)
    for name, desc in MODEL_DESCRIPTIONS.items():
        if name != "mlp" and len(shape) != 3:
            table.add_row(name, desc, "-", "-", "needs CxHxW input")
            continue
        bn = build_model(NetworkConfig(name, shape, num_classes))
        plain = build_model(NetworkConfig(name, shape, num_classes, norm=False))
        table.add_row(
            name,
            desc,
            f"{count_parameters(bn):,}",
            f"{count_parameters(plain):,}",
            str(count_batchnorms(bn)),
        )
    return table
