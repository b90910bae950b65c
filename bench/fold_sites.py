"""Fold BatchNorm in public architectures from pure-PyTorch model packages, and time them.

    pip install --no-deps efficientnet_pytorch==0.7.1 geffnet==1.0.2 pytorchcv==0.0.74
    python bench/fold_sites.py [--models NAME,...] [--iterations 30] [--no-write]

``--no-deps`` because geffnet declares torchvision, whose PyPI build pulls in
another torch (and does not load with the CPU torch wheel); the models used
here import neither torchvision nor anything else those packages declare.

Every model is built with random weights (nothing is downloaded), its BN
statistics and affine parameters randomized (``randomize_batchnorm``), in eval
mode, on 224x224 RGB inputs. Per model: BN layers, folded, kept (with the
reasons, grouped below the table), the max relative error of the folded output
(``max |folded - unfolded| / max |unfolded|`` on a batch of 8, float32), and
eager-PyTorch latency, unfolded against folded, interleaved, at batch 1 and 8
(``training.bench_torch.bench_folding``: p50 per call, and the speedup's 95%
interval), each cell started once other processes leave the CPUs quiet (or after
``--max-wait``), with the CPU they used meanwhile in its own column. Prints the
table with its conditions and writes it into ``docs/folding.md``, between
``<!-- fold_sites:start -->`` and ``<!-- fold_sites:end -->``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import torch
from fold_latency import OtherCpu, wait_for_quiet  # a sibling script, as throughput.py does
from markdown_section import publish
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from service.models.sessions import CPU
from service.process.machine import machine_facts
from training.batchnorm import randomize_batchnorm
from training.bench_torch import bench_folding
from training.fold import FoldReport, fold_batchnorm

START, END = "<!-- fold_sites:start -->", "<!-- fold_sites:end -->"
INPUT = (3, 224, 224)


def _efficientnet_pytorch(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from efficientnet_pytorch import EfficientNet

        model: nn.Module = EfficientNet.from_name(name)  # from_pretrained would download
        return model

    return build


def _geffnet(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import geffnet

        model: nn.Module = geffnet.create_model(name, pretrained=False)
        return model

    return build


def _pytorchcv(module: str, name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:  # the model's module only: pytorchcv's registry imports torchvision
        import importlib

        model: nn.Module = getattr(importlib.import_module(f"pytorchcv.models.{module}"), name)()
        return model

    return build


# name -> (package, builder). What each shows: same-padding convs (efficientnet_pytorch,
# geffnet tf_*), mixed-kernel concats (mixnet), both at once (tf_mixnet_s), a network torch.fx
# cannot trace (tf_mobilenetv3: TorchScript activations), DenseNet's shared features.
MODELS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "efficientnet-b0": ("efficientnet_pytorch", _efficientnet_pytorch("efficientnet-b0")),
    "mixnet_s": ("geffnet", _geffnet("mixnet_s")),
    "tf_efficientnet_b0": ("geffnet", _geffnet("tf_efficientnet_b0")),
    "tf_mixnet_s": ("geffnet", _geffnet("tf_mixnet_s")),
    "tf_mobilenetv3_large_100": ("geffnet", _geffnet("tf_mobilenetv3_large_100")),
    "mixnet_s (pytorchcv)": ("pytorchcv", _pytorchcv("mixnet", "mixnet_s")),
    "densenet121": ("pytorchcv", _pytorchcv("densenet", "densenet121")),
}


@dataclass(frozen=True)
class Row:
    model: str
    package: str
    bns: int
    report: FoldReport
    rel_error: float
    p50_ms: dict[int, tuple[float, float]]  # batch -> (unfolded, folded)
    speedup: dict[int, tuple[float, float, float]]  # batch -> (ratio, ci_low, ci_high)
    other_cores: dict[int, float]  # batch -> CPU other processes used while it ran, in cores


def measure(name: str, iterations: int, warmup: int, seed: int, max_wait: float) -> Row:
    package, build = MODELS[name]
    torch.manual_seed(seed)
    model = build().eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    bns = sum(isinstance(m, _BatchNorm) for m in model.modules())
    x = torch.randn(8, *INPUT, generator=torch.Generator().manual_seed(seed + 1))
    folded, report = fold_batchnorm(model, x[:2])
    with torch.inference_mode():
        expected, out = model(x), folded(x)
    rel_error = float((out - expected).abs().max() / expected.abs().max())
    p50, speedup, others = {}, {}, {}
    for batch in (1, 8):
        wait_for_quiet(max_wait)
        meter = OtherCpu()
        bench = bench_folding(
            model, INPUT, batch_size=batch, iterations=iterations, warmup=warmup, seed=seed
        )
        others[batch] = meter.cores()
        p50[batch] = bench.p50_ms()
        s = bench.speedup()
        speedup[batch] = (s.ratio, s.ci_low, s.ci_high)
    return Row(name, package, bns, report, rel_error, p50, speedup, others)


def reason_kind(reason: str) -> str:
    """A kept reason with its layer and node names blanked, so that alike reasons group."""
    reason = re.sub(r"'[^']*'", "'…'", reason)
    return re.sub(r"\b(cat|add|mul|getattr|getitem|mean)(_\d+)?\b", "…", reason)


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| model | package | BN | folded | kept | max rel. error "
        "| batch 1: unfolded / folded ms | speedup [95% CI] "
        "| batch 8: unfolded / folded ms | speedup [95% CI] | others' CPU, cores (b1, b8) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.model, r.package, str(r.bns), str(len(r.report.folded))]
        cells += [str(len(r.report.kept)), f"{r.rel_error:.1e}"]
        for batch in (1, 8):
            (u, f), (s, lo, hi) = r.p50_ms[batch], r.speedup[batch]
            cells += [f"{u:.1f} / {f:.1f}", f"{s:.2f}x [{lo:.2f}, {hi:.2f}]"]
        cells.append(f"{r.other_cores[1]:.2f}, {r.other_cores[8]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


class Kept(Protocol):
    """A BN a fold left in place: ``foldserve.model_format.KeptBatchNorm``, from either folder."""

    @property
    def bn(self) -> str: ...

    @property
    def reason(self) -> str: ...


def kept_reasons(kept: list[tuple[str, Sequence[Kept]]]) -> list[str]:
    """Markdown under its own heading: per (model, kept BNs), one line per kind of reason
    (:func:`reason_kind`) with its count and an example. Shared with onnx_fold_networks.py."""
    lines = []
    for model, bns in kept:
        kinds = Counter(reason_kind(k.reason) for k in bns)
        examples = {reason_kind(k.reason): k for k in reversed(bns)}
        for kind, count in kinds.most_common():
            k = examples[kind]
            lines.append(f"- {model}: {count} kept, e.g. `{k.bn}`: {k.reason}")
    return ["Kept BNs, by reason:", "", *(lines or ["- none: every BN of every model folded"])]


def chosen_models(parser: argparse.ArgumentParser, models: str) -> list[str]:
    """The names in ``--models`` (comma-separated); one not in :data:`MODELS` is a usage
    error. Shared with onnx_fold_networks.py."""
    names = [n.strip() for n in models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    return names


def conditions(iterations: int, warmup: int) -> list[str]:
    facts = machine_facts(CPU)
    load = ", ".join(f"{v:.2f}" for v in facts["load_average"] or [])
    return [
        f"command: `{shlex.join(['python', 'bench/fold_sites.py', *sys.argv[1:]])}`",
        f"machine: {facts['cpu']}, {facts['usable_cpus']} usable CPUs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average at the end {load}",
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {iterations} interleaved pairs per "
        f"latency cell after {warmup} warm-up pairs; inputs {INPUT}, float32, eager PyTorch",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS), help="a subset of these")
    parser.add_argument("--iterations", type=int, default=30, help="interleaved pairs per cell")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-wait", type=float, default=120.0, help="s to wait for a quiet machine per cell"
    )
    parser.add_argument("--doc", type=Path, default=Path("docs/folding.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    names = chosen_models(parser, args.models)
    rows = [
        measure(n, args.iterations, args.warmup, args.seed, args.max_wait)
        for n in tqdm(names, desc="models", file=sys.stderr)
    ]
    lines = [
        *(f"- {c}" for c in conditions(args.iterations, args.warmup)),
        "",
        *table(rows),
        "",
        *kept_reasons([(r.model, r.report.kept) for r in rows]),
    ]
    publish(lines, args.doc, START, END, write=not args.no_write)


if __name__ == "__main__":
    main()
