"""The report of bench/fold_latency.py: its cells, the table, the verdicts, the plot."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

START, END = "<!-- fold_latency:start -->", "<!-- fold_latency:end -->"
CONTROL = "ORT A/A"  # model.onnx against itself: what the method shows when nothing differs
RUNTIMES = ("torch eager", "ORT opt off", "ORT default", "ORT CUDA", CONTROL)


@dataclass(frozen=True)
class Cell:
    """One comparison: ``speedup`` = unfolded p50 / folded p50, with its bootstrap 95% CI."""

    model: str
    batch_size: int
    runtime: str
    unfolded_p50_ms: float
    folded_p50_ms: float
    speedup: float
    ci_low: float
    ci_high: float
    iterations: int
    max_abs_diff: float | None
    other_cores: float = math.nan  # CPU other processes used while the cell ran, in cores


@dataclass(frozen=True)
class Target:
    """A speedup the issue asks for, checked against the interval's lower bound."""

    text: str
    model: str
    runtime: str
    batch_sizes: tuple[int, ...]
    at_least: float


TARGETS = (
    Target("breast_cancer_mlp, ORT default, batch 1: >= 1.10x", "breast_cancer_mlp",
           "ORT default", (1,), 1.10),
    Target("resnet_bench, ORT opt off: >= 1.15x", "resnet_bench", "ORT opt off", (1, 8, 64), 1.15),
    Target("resnet_bench, torch eager: >= 1.15x", "resnet_bench", "torch eager", (1, 8, 64), 1.15),
)  # fmt: skip


def table(cells: list[Cell]) -> list[str]:
    lines = [
        "| model | batch | runtime | unfolded p50 ms | folded p50 ms | speedup | 95% CI | runs "
        "| max abs diff | other CPU |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for c in cells:
        diff = "n/a" if c.max_abs_diff is None else f"{c.max_abs_diff:.1e}"
        flag = " **slower**" if c.ci_high < 1.0 and c.runtime != CONTROL else ""
        lines.append(
            f"| {c.model} | {c.batch_size} | {c.runtime} | {c.unfolded_p50_ms:.4g} | "
            f"{c.folded_p50_ms:.4g} | {c.speedup:.3f}{flag} | {c.ci_low:.3f}-{c.ci_high:.3f} | "
            f"{c.iterations} | {diff} | {c.other_cores:.2f} |"
        )
    return lines


def verdicts(cells: list[Cell]) -> list[str]:
    slower = [c for c in cells if c.ci_high < 1.0 and c.runtime != CONTROL]
    # How far the A/A control's intervals sit from 1: the method's own bias between sessions.
    bias = max(
        (max(1.0 - c.ci_high, c.ci_low - 1.0, 0.0) for c in cells if c.runtime == CONTROL),
        default=math.nan,
    )
    if not slower:
        first = "met (no cell has its whole interval below 1)"
    else:
        first = "missed in " + ", ".join(
            f"{c.model}/{c.runtime}/batch {c.batch_size} (interval ends "
            f"{100 * (1 - c.ci_high):.1f}% below 1)"
            for c in slower
        )
        first += f"; the A/A control's intervals sit up to {100 * bias:.1f}% from 1"
    lines = [f"- folded never slower beyond the interval: {first}"]
    for target in TARGETS:
        found = [
            c
            for c in cells
            if (c.model, c.runtime) == (target.model, target.runtime)
            and c.batch_size in target.batch_sizes
        ]
        if not found:
            lines.append(f"- {target.text}: not measured")
            continue
        parts = [
            f"batch {c.batch_size} {c.speedup:.3f}x [{c.ci_low:.3f}, {c.ci_high:.3f}] "
            + ("met" if c.ci_low >= target.at_least else "missed")
            for c in found
        ]
        lines.append(f"- {target.text}: " + "; ".join(parts))
    return lines


def plot(cells: list[Cell], path: Path, batch_sizes: list[int]) -> None:
    """One panel per model: speedup bars per batch size and runtime, with their intervals."""
    models = list(dict.fromkeys(c.model for c in cells))
    runtimes = [r for r in RUNTIMES if any(c.runtime == r for c in cells)]
    fig = Figure(figsize=(4.2 * len(models), 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(models), sharey=True, squeeze=False)[0]
    width = 0.8 / max(1, len(runtimes))
    low = min(0.9, min(c.ci_low for c in cells) - 0.02)
    high = max(c.ci_high for c in cells) + 0.05
    for ax, model in zip(axes, models, strict=True):
        for k, runtime in enumerate(runtimes):
            found = {c.batch_size: c for c in cells if (c.model, c.runtime) == (model, runtime)}
            xs = [
                i + (k - (len(runtimes) - 1) / 2) * width
                for i, b in enumerate(batch_sizes)
                if b in found
            ]
            shown = [found[b] for b in batch_sizes if b in found]
            errors = np.array([[c.speedup - c.ci_low, c.ci_high - c.speedup] for c in shown]).T
            ax.bar(
                xs,
                [c.speedup for c in shown],
                width,
                yerr=errors.reshape(2, -1),
                capsize=2,
                label=runtime,
            )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(batch_sizes)), [f"batch {b}" for b in batch_sizes])
        ax.set_title(model, fontsize=10)
        for level in sorted({t.at_least for t in TARGETS if t.model == model}):
            which = ", ".join(t.runtime for t in TARGETS if (t.model, t.at_least) == (model, level))
            if which:
                ax.axhline(level, color="gray", linestyle="--", linewidth=0.8)
                ax.annotate(
                    f"target {level:.2f}x ({which})",
                    (0.01, level),
                    xycoords=("axes fraction", "data"),
                    fontsize=7,
                    color="dimgray",
                    va="center",
                    zorder=5,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1},
                )
        ax.set_ylim(low, high)
        ax.grid(axis="y", linewidth=0.3)
    axes[0].set_ylabel("speedup (unfolded p50 / folded p50)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(
        "Folded vs unfolded latency (bars: speedup, whiskers: 95% bootstrap CI)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
