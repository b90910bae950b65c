"""PNG figures of the BN experiments.

Figures are built with matplotlib's object API (``Figure`` + the Agg canvas), so
nothing here touches pyplot's global state or needs a display. Every function
takes plain per-seed numbers and writes one PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLORS = {
    "BN": "tab:blue",
    "no BN": "tab:orange",
    "dropout": "tab:green",
    "BN + dropout": "tab:purple",
    "BN before": "tab:blue",
    "BN after": "tab:red",
    "noisy BN": "tab:green",
    "noisy BN, mild": "tab:olive",
}


def _color(arm: str) -> str:
    return COLORS.get(arm, "tab:gray")


def _figure(rows: int, cols: int, width: float = 4.2, height: float = 3.3) -> Figure:
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _padded(curves: Sequence[Sequence[float]]) -> np.ndarray:
    """(seeds, epochs) with NaN after a run that stopped early (diverged)."""
    n = max(len(c) for c in curves)
    out = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        out[i, : len(c)] = c
    return out


def _band(ax: Axes, x: np.ndarray, ys: np.ndarray, arm: str, marker: str = "") -> None:
    """Mean line with a +-1 std band over seeds (rows of ``ys``)."""
    mean = np.nanmean(ys, axis=0)
    std = np.nanstd(ys, axis=0, ddof=1) if ys.shape[0] > 1 else np.zeros_like(mean)
    ax.plot(x, mean, color=_color(arm), label=arm, marker=marker, markersize=4)
    ax.fill_between(x, mean - std, mean + std, color=_color(arm), alpha=0.2, linewidth=0)


@dataclass
class CurvePanel:
    title: str
    target: float
    arms: dict[str, list[list[float]]]  # arm -> per seed: validation accuracy per epoch


def plot_learning_curves(path: Path, panels: list[CurvePanel], ylabel: str) -> None:
    fig = _figure(1, len(panels))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, p in zip(axes, panels, strict=True):
        for arm, curves in p.arms.items():
            ys = _padded(curves)
            _band(ax, np.arange(1, ys.shape[1] + 1), ys, arm)
        ax.axhline(p.target, color="black", linestyle=":", linewidth=1, label="target")
        ax.set(
            title=p.title,
            xlabel="epoch",
            ylabel=ylabel,
            ylim=(max(0.0, p.target - 0.45), 1.0),
        )
        ax.title.set_fontsize(8)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{ylabel.capitalize()} per epoch (mean ± 1 std over seeds)")
    _save(fig, path)


@dataclass
class SweepPanel:
    title: str
    lrs: list[float]
    threshold: float  # accuracy that counts as usable
    accuracy: dict[str, list[list[float]]]  # arm -> per lr: per-seed accuracy (diverged: 1/K)
    diverged: dict[str, list[list[bool]]]  # arm -> per lr: per seed, did the run diverge


def plot_lr_sweep(path: Path, panels: list[SweepPanel]) -> None:
    """Per seed: a dot, or an ``x`` at its counted accuracy when the run diverged."""
    fig = _figure(2, len(panels), height=2.6)
    axes = fig.subplots(
        2, len(panels), squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 1]}
    )
    for col, p in enumerate(panels):
        top, bottom = axes[0, col], axes[1, col]
        x = np.asarray(p.lrs)
        n_arms = len(p.accuracy)
        for i, (arm, acc) in enumerate(p.accuracy.items()):
            offset = 1.12 ** (i - (n_arms - 1) / 2)
            top.plot(x, [np.mean(a) for a in acc], color=_color(arm), label=arm)
            for lr, a, div in zip(x, acc, p.diverged[arm], strict=True):
                ok = [v for v, d in zip(a, div, strict=True) if not d]
                bad = [v for v, d in zip(a, div, strict=True) if d]
                top.scatter([lr * offset] * len(ok), ok, color=_color(arm), s=8, alpha=0.6)
                top.scatter([lr * offset] * len(bad), bad, color=_color(arm), marker="x", s=30)
            share = [float(np.mean(d)) for d in p.diverged[arm]]
            bottom.bar(x * offset, share, width=x * 0.1, color=_color(arm), label=arm)
        top.axhline(p.threshold, color="black", linestyle=":", linewidth=1, label="usable")
        top.scatter([], [], color="gray", marker="x", label="diverged (counted as 1/K)")
        top.set(title=p.title, ylabel="last-epoch test accuracy", xscale="log", ylim=(0.0, 1.02))
        top.legend(loc="lower center", fontsize=7)
        bottom.set(
            xlabel="learning rate (SGD, momentum 0.9)",
            ylabel="diverged",
            xscale="log",
            ylim=(0.0, 1.05),
        )
    fig.suptitle("Learning-rate sweep: seeds as dots, diverged runs as x")
    _save(fig, path)


@dataclass
class BarPanel:
    title: str
    arms: dict[str, list[float]]  # arm -> per-seed values


def plot_bars(
    path: Path,
    rows: list[tuple[str, list[BarPanel]]],
    title: str,
    percent_rows: tuple[int, ...] = (0,),
) -> None:
    """One row of panels per metric (``(ylabel, panels)``); bars are means, dots are seeds.

    Rows in ``percent_rows`` hold fractions and are drawn in percent.
    """
    cols = max(len(panels) for _, panels in rows)
    fig = _figure(len(rows), cols)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (ylabel, panels) in enumerate(rows):
        scale = 100.0 if r in percent_rows else 1.0
        for c, p in enumerate(panels):
            ax = axes[r, c]
            for i, (arm, values) in enumerate(p.arms.items()):
                v = np.asarray(values) * scale
                ax.bar(
                    i,
                    v.mean(),
                    yerr=v.std(ddof=1) if len(v) > 1 else 0.0,
                    color=_color(arm),
                    alpha=0.7,
                    capsize=4,
                )
                ax.scatter(
                    np.full(len(v), i) + np.linspace(-0.15, 0.15, len(v)),
                    v,
                    color="black",
                    s=10,
                    zorder=3,
                )
            ax.set_xticks(range(len(p.arms)), list(p.arms), fontsize=8)
            ax.set(title=p.title, ylabel=ylabel)
            if r in percent_rows and "accuracy" in ylabel:
                low = min(min(vs) for vs in p.arms.values()) * scale
                ax.set_ylim(max(0.0, low - 5.0), 100.5)
        for c in range(len(panels), cols):
            axes[r, c].set_visible(False)
    fig.suptitle(title)
    _save(fig, path)


@dataclass
class SigmoidData:
    depths: list[int]
    init_norms: dict[tuple[int, str], list[list[float]]]  # (depth, arm) -> per seed: per layer
    accuracy: dict[str, list[list[float]]]  # arm -> per depth: per-seed test accuracy
    saturated: dict[str, list[list[float]]]  # arm -> per depth: per-seed saturated share
    gains: list[float]
    explode: dict[str, list[list[float]]]  # arm -> per gain: per-seed log10 first-layer norm


def plot_sigmoid(path: Path, d: SigmoidData, arms: Sequence[str]) -> None:
    fig = _figure(1, 4, width=4.0)
    ax_init, ax_acc, ax_sat, ax_exp = fig.subplots(1, 4)
    styles = ["-", "--", "-.", ":"]
    for j, depth in enumerate(d.depths):
        for arm in arms:
            norms = np.asarray(d.init_norms[depth, arm])[:, :depth]  # hidden layers only
            ax_init.plot(
                np.arange(1, depth + 1),
                np.exp(np.log(np.maximum(norms, 1e-30)).mean(axis=0)),
                color=_color(arm),
                linestyle=styles[j % len(styles)],
                marker="o",
                markersize=3,
                label=f"{arm}, depth {depth}",
            )
    ax_init.set(
        title="sigmoid, Glorot: grad norm per layer at init",
        yscale="log",
        xlabel="hidden layer (1 = input side)",
        ylabel="||dL/dW|| (geometric mean)",
    )
    ax_init.legend(fontsize=6)
    x = np.asarray(d.depths, dtype=float)
    for arm in arms:
        _band(ax_acc, x, np.asarray(d.accuracy[arm]).T, arm, marker="o")
        _band(ax_sat, x, np.asarray(d.saturated[arm]).T, arm, marker="o")
        _band(ax_exp, np.asarray(d.gains), np.asarray(d.explode[arm]).T, arm, marker="o")
    ax_acc.set(title="sigmoid: test accuracy, last epoch", xlabel="hidden layers",
               ylim=(0.0, 1.02), xticks=d.depths)  # fmt: skip
    ax_sat.set(title="sigmoid: saturated share after training", xlabel="hidden layers",
               xticks=d.depths)  # fmt: skip
    ax_exp.set(title="deep ReLU: first-layer grad at init", xlabel="init gain (x He)",
               ylabel="log10 ||dL/dW1||", xticks=d.gains)  # fmt: skip
    for ax in (ax_acc, ax_sat, ax_exp):
        ax.legend(fontsize=8)
        ax.title.set_fontsize(9)
    fig.suptitle("Vanishing, saturation and exploding gradients with and without BN")
    _save(fig, path)


@dataclass
class StepPanel:
    title: str
    ylabel: str
    arms: dict[str, list[list[float]]]  # arm -> per seed: one value per measurement
    log: bool = False
    skip_first: bool = False


def plot_steps(path: Path, steps: list[int], panels: list[StepPanel], title: str) -> None:
    """Measurements over training steps, one panel each (mean ± 1 std over seeds)."""
    fig = _figure(1, len(panels))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    first = 1 if any(p.skip_first for p in panels) else 0
    for ax, p in zip(axes, panels, strict=True):
        lo = first if p.skip_first else 0
        for arm, curves in p.arms.items():
            ys = _padded([c[lo:] for c in curves])
            if p.log:
                ys = np.log10(np.maximum(ys, 1e-30))
            _band(ax, np.asarray(steps[lo : lo + ys.shape[1]]), ys, arm)
        ylabel = f"log10 {p.ylabel}" if p.log else p.ylabel
        ax.set(title=p.title, xlabel="SGD step", ylabel=ylabel)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def plot_batch_sizes(
    path: Path, batch_sizes: list[int], accuracy: dict[str, list[list[float]]], title: str
) -> None:
    """``accuracy``: arm -> per batch size: per-seed test accuracy."""
    fig = _figure(1, 1, width=5.0)
    ax = fig.subplots()
    x = np.asarray(batch_sizes, dtype=float)
    for arm, acc in accuracy.items():
        _band(ax, x, np.asarray(acc).T, arm, marker="o")
    ax.set(title=title, xscale="log", xlabel="batch size", ylabel="test accuracy")
    ax.set_xticks(x, [str(b) for b in batch_sizes])
    ax.legend()
    _save(fig, path)
