"""Which tool folds which BN pattern: FoldServe's ONNX folder, onnxoptimizer's
``fuse_bn_into_conv``, ONNX Runtime's own graph fusion, and onnxsim, on the hand-built
graphs of ``tests/foldserve/onnx_graphs.py`` (float32 and float16).

    python bench/onnx_fold_tools.py [--dtypes float32,float16] [--no-write]

onnxoptimizer and onnxsim pin their own onnx, so they run in ``bench/.venv-onnx-tools``
(created with pip on first use, never the project's venv), in a subprocess that reads the
graphs from a temporary directory and writes what the tool made of them. ONNX Runtime's
fusion is what ORT_ENABLE_EXTENDED does at session creation, read back from the optimized
model it saves (``SessionOptions.optimized_model_filepath``).

A cell says whether the pattern folded (no BatchNormalization and no Mul left on the path
from the inputs, Add only as a MatMul's bias; arithmetic left on constants does not count)
and the max abs difference of that graph's outputs from the original's (both run by ORT
with graph optimizations off, on the same random inputs); "WRONG" marks a result beyond
FoldServe's default tolerance. Prints the table with its
conditions and writes it into ``docs/folding.md`` between ``<!-- onnx_fold_tools:start -->``
and ``<!-- onnx_fold_tools:end -->``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from markdown_section import publish  # a sibling script, as fold_sites.py does

from foldserve.onnx_fold import FoldCheckFailed, default_tolerance, fold_model

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
graphs: Any = importlib.import_module("tests.foldserve.onnx_graphs")  # the tests' graph builders

TOOLS_VENV = BENCH / ".venv-onnx-tools"
TOOLS_PACKAGES = ["onnxoptimizer", "onnxsim", "onnxruntime", "numpy"]
START, END = "<!-- onnx_fold_tools:start -->", "<!-- onnx_fold_tools:end -->"
TOOLS = ["FoldServe", "onnxoptimizer", "ONNX Runtime", "onnxsim"]
# Runs inside TOOLS_VENV: argv = tool, directory. Writes <name>.<tool>.onnx or .error.
TOOL_SCRIPT = """
import json, sys, pathlib, onnx
tool, folder = sys.argv[1], pathlib.Path(sys.argv[2])
if tool == "onnxoptimizer":
    import onnxoptimizer as lib
    run = lambda m: lib.optimize(m, ["fuse_bn_into_conv"])
else:
    import onnxsim as lib
    run = lambda m: lib.simplify(m)[0]
for path in sorted(folder.glob("*.orig.onnx")):
    out = path.with_name(path.name.replace(".orig.", f".{tool}."))
    try:
        onnx.save(run(onnx.load(path)), out)
    except Exception as err:
        out.with_suffix(".error").write_text(f"{type(err).__name__}: {err}"[:200])
print(json.dumps({"version": getattr(lib, "__version__", "?"), "onnx": onnx.__version__}))
"""


@dataclass
class Cell:
    folded: bool
    diff: float | None  # None: the tool failed or its graph did not run
    wrong: bool
    note: str = ""

    def text(self) -> str:
        if self.diff is None:
            note = " ".join(self.note.replace("|", "/").split())
            return f"error ({note})" if note else "error"
        verdict = "yes" if self.folded else "no"
        return f"{'WRONG ' if self.wrong else ''}{verdict} {self.diff:.1e}"


def tools_python() -> Path | None:
    """The interpreter of bench/.venv-onnx-tools, created if absent; None if pip fails."""
    python = TOOLS_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {TOOLS_VENV} (pip install {' '.join(TOOLS_PACKAGES)}) ...")
        venv.create(TOOLS_VENV, with_pip=True)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *TOOLS_PACKAGES], check=False
        )
        if done.returncode != 0:
            return None
    return python


def run_tool(python: Path, tool: str, folder: Path) -> str:
    """Apply ``tool`` to every graph in ``folder``; its version (or why it did not run)."""
    done = subprocess.run(
        [str(python), "-c", TOOL_SCRIPT, tool, str(folder)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return f"not run: {done.stderr.strip().splitlines()[-1:]}"
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return f"{tool} {info['version']} (onnx {info['onnx']})"


def ort_fused(model: onnx.ModelProto, path: Path) -> None:
    """What ONNX Runtime's ORT_ENABLE_EXTENDED graph optimizations make of ``model``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return [np.asarray(o, np.float64) for o in session.run(None, feeds)]


def feeds_for(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    stored = {t.name for t in model.graph.initializer}  # inputs with a default: not fed
    for info in model.graph.input:
        if info.name in stored:
            continue
        kind = info.type.tensor_type.elem_type
        if kind == onnx.TensorProto.BOOL:
            feeds[info.name] = np.array(True)
            continue
        dims = [d.dim_value or 2 for d in info.type.tensor_type.shape.dim]
        np_type = onnx.helper.tensor_dtype_to_np_dtype(kind)
        feeds[info.name] = rng.standard_normal(dims).astype(np_type)
    return feeds


def judge(original: onnx.ModelProto, candidate: onnx.ModelProto, seed: int) -> Cell:
    feeds = feeds_for(original, seed)
    expected = outputs(original, feeds)
    try:
        got = outputs(candidate, feeds)
    except Exception as err:  # ORT's errors share no public base class
        return Cell(False, None, False, str(err).split(":")[-1].strip()[:60])
    diff = max(float(np.max(np.abs(e - g))) for e, g in zip(expected, got, strict=True))
    scale = max(1.0, *(float(np.max(np.abs(e))) for e in expected))
    left = on_activations(candidate)
    folded = (
        left.get("BatchNormalization", 0) == 0
        and left.get("Mul", 0) == 0
        and left.get("Add", 0) <= left.get("MatMul", 0)
    )
    return Cell(folded, diff, diff > default_tolerance(original, scale))


def on_activations(model: onnx.ModelProto) -> dict[str, int]:
    """Node counts by op type, of the nodes that read (transitively) a graph input, in the
    main graph and If branches: arithmetic a tool left on constants only (onnxoptimizer
    computes the folded weights with graph nodes) is not counted."""
    live = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    counts: dict[str, int] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            subgraphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            inner = {n for g in subgraphs for m in g.node for n in m.input}
            if live & (set(node.input) | inner):
                live.update(node.output)
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for g in subgraphs:
                walk(g)

    walk(model.graph)
    return counts


def measure(dtypes: list[str], seed: int) -> tuple[dict[tuple[str, str, str], Cell], list[str]]:
    """(pattern, dtype, tool) -> cell; and the tools' versions."""
    cells: dict[tuple[str, str, str], Cell] = {}
    python = tools_python()
    versions = ["FoldServe (this checkout)", f"onnxruntime {ort.__version__} (EXTENDED)"]
    with tempfile.TemporaryDirectory(prefix="onnx-fold-tools-") as tmp:
        folder = Path(tmp)
        originals = {}
        for pattern in graphs.PATTERNS:
            for dtype in dtypes:
                name = f"{pattern}-{dtype}"
                originals[name] = graphs.build(pattern, dtype)
                onnx.save(originals[name], folder / f"{name}.orig.onnx")
        for tool in ("onnxoptimizer", "onnxsim"):
            versions.append(run_tool(python, tool, folder) if python else f"{tool}: no venv")
        for name, original in originals.items():
            pattern, dtype = name.rsplit("-", 1)
            try:
                ours = fold_model(original, seed=seed).model
                cells[pattern, dtype, "FoldServe"] = judge(original, ours, seed)
            except FoldCheckFailed as err:
                cells[pattern, dtype, "FoldServe"] = Cell(False, None, True, str(err)[:60])
            fused = folder / f"{name}.ort.onnx"
            ort_fused(original, fused)
            cells[pattern, dtype, "ONNX Runtime"] = judge(original, onnx.load(fused), seed)
            for tool in ("onnxoptimizer", "onnxsim"):
                made = folder / f"{name}.{tool}.onnx"
                if made.exists():
                    cells[pattern, dtype, tool] = judge(original, onnx.load(made), seed)
                else:
                    error = made.with_suffix(".error")
                    note = error.read_text()[:60] if error.exists() else "not run"
                    cells[pattern, dtype, tool] = Cell(False, None, False, note)
    return cells, versions


def table(cells: dict[tuple[str, str, str], Cell], dtypes: list[str]) -> list[str]:
    lines = [
        "| pattern | " + " | ".join(TOOLS) + " |",
        "|---|" + "---|" * len(TOOLS),
    ]
    for pattern in graphs.PATTERNS:
        row = [" / ".join(cells[pattern, d, t].text() for d in dtypes) for t in TOOLS]
        lines.append(f"| {pattern} | " + " | ".join(row) + " |")
    totals = []
    for tool in TOOLS:
        per = []
        for d in dtypes:
            ok = sum(
                1
                for p in graphs.PATTERNS
                if cells[p, d, tool].folded and not cells[p, d, tool].wrong
            )
            per.append(f"{ok}/{len(graphs.PATTERNS)}")
        totals.append(" / ".join(per))
    lines.append("| **folded correctly** | " + " | ".join(totals) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtypes", default="float32,float16", help="comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--doc", type=Path, default=Path("docs/folding.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    cells, versions = measure(dtypes, args.seed)
    lines = [
        f"- command: `python bench/onnx_fold_tools.py --dtypes {','.join(dtypes)}`",
        f"- tools: {'; '.join(versions)}",
        "- onnxoptimizer runs its `fuse_bn_into_conv` pass only; onnxsim its default "
        "`simplify`; ONNX Runtime's graph is the one it saves at ORT_ENABLE_EXTENDED (CPU)",
        f"- cell: folded yes/no, then max abs diff vs the original, {' / '.join(dtypes)}; "
        "WRONG = beyond FoldServe's default tolerance; inputs standard normal, batch 2",
        "",
        *table(cells, dtypes),
    ]
    publish(lines, args.doc, START, END, write=not args.no_write)


if __name__ == "__main__":
    main()
