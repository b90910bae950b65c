"""Fixtures for the service tests: real trained models, hand-built ONNX models, live servers.

Only these fixtures import training (and so torch); the service under test never does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldserve.model_format import (
    FOLDED_FILE,
    UNFOLDED_FILE,
    FoldRecord,
    KeptBatchNorm,
    ReferenceBatch,
    TensorData,
    TensorSpec,
    VersionMetadata,
    commit_version,
    sha256_hex,
)
from foldserve.model_format import write_version as write_version_files
from tests.servers import LiveServer, live_server, server_settings


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each schemathesis item (one per API operation) a node id of its own.

    schemathesis 4 names them ``test[POST /v2/...]`` and sets the old ``_nodeid``, which
    pytest 9 no longer reads (node ids are ``_id``): every operation kept the function's
    id. pytest counts progress by node id (880 of 901: a full run ended at "[ 97%]"), and
    --lf, --durations and junit merged the operations.
    """
    for item in items:
        node_id = getattr(item, "_id", None)
        if "[" in item.name and node_id is not None and node_id.params is None:
            item._id = node_id.with_params(item.name[item.name.index("[") + 1 : -1])


# -- models ------------------------------------------------------------------


def linear_model(in_dim: int, out_dim: int, seed: int = 0) -> onnx.ModelProto:
    """x (N, in_dim) -> x @ W + b (N, out_dim), FP32."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(in_dim, out_dim)).astype(np.float32)
    b = rng.normal(size=out_dim).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["scores"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_dim])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", out_dim])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def two_io_model() -> onnx.ModelProto:
    """a, b (N, 3) FP32 -> sum = a + b, product = a * b."""
    spec = [("a", TensorProto.FLOAT), ("b", TensorProto.FLOAT)]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Mul", ["a", "b"], ["product"]),
        ],
        "two_io",
        [helper.make_tensor_value_info(n, t, ["N", 3]) for n, t in spec],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("sum", "product")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def write_version(
    repo: Path,
    name: str,
    version: int,
    model: onnx.ModelProto,
    *,
    labels: list[str] | None = None,
    features: list[str] | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Write a complete version with the repository contract's own writer.

    ``edit`` may change the metadata (as JSON) before it is written, to break it on
    purpose. The unfolded file is the same graph (tests only need it to exist and match).
    """
    data = model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(version)
    ref_in = {
        i.name: rng.normal(size=(3, *i.shape[1:])).astype(np.float32) for i in session.get_inputs()
    }
    ref_out = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, ref_in), strict=True)
    )
    meta = VersionMetadata(
        name=name,
        inputs=[
            TensorSpec(name=i.name, datatype="FP32", shape=(-1, *i.shape[1:]))
            for i in session.get_inputs()
        ],
        outputs=[
            TensorSpec(name=o.name, datatype="FP32", shape=(-1, *o.shape[1:]))
            for o in session.get_outputs()
        ],
        labels=labels or [],
        features=features or [],
        fold_report=FoldRecord(kept=[KeptBatchNorm(bn="bn0", reason="test model")]),
        bn_nodes={"folded": 0, "unfolded": 0},
        reference=ReferenceBatch(
            inputs={k: TensorData.of(v) for k, v in ref_in.items()},
            outputs={k: TensorData.of(v) for k, v in ref_out.items()},
            atol=1e-5,
        ),
    )
    files = {FOLDED_FILE: data, UNFOLDED_FILE: data}
    model_dir = repo / name
    if edit is None:
        write_version_files(model_dir, files, meta, version=version)
    else:
        sha = {f: sha256_hex(b) for f, b in files.items()}

        def edited(number: int) -> bytes:
            raw = json.loads(meta.model_copy(update={"version": number, "sha256": sha}).to_json())
            edit(raw)
            return json.dumps(raw).encode()

        commit_version(model_dir, files, edited, version=version)
    return model_dir / str(version)


@dataclass
class ModelStore:
    """A repository of real models trained and exported once per test session."""

    root: Path
    runs: dict[str, Path]

    def copy_to(self, target: Path) -> Path:
        shutil.copytree(self.root, target)
        return target


STORE_MODELS = (
    ("digits_cnn", "cnn", "digits", 8),
    ("breast_cancer_mlp", "mlp", "breast_cancer", 16),
)


def train_store(base: Path) -> None:
    """Train and export the store's models into ``base/models`` (runs in ``base/runs``)."""
    from training.data import load_dataset
    from training.export import export_run
    from training.quantize import Int8Options
    from training.train import DatasetSpec, TrainConfig, save_run, train
    from training.zoo import NetworkConfig

    root = base / "models"
    for name, model, dataset, width in STORE_MODELS:
        ds = load_dataset(dataset, seed=0)
        mcfg = NetworkConfig(model, ds.input_shape, ds.num_classes, width=width)
        tcfg = TrainConfig(epochs=1, seed=0)
        run_dir = base / "runs" / name
        save_run(
            run_dir,
            train(mcfg, ds, tcfg, progress=False),
            mcfg,
            DatasetSpec(dataset),
            tcfg,
            ds.labels,
            ds.features,
        )
        # digits_cnn also gets model.int8.onnx, as `export --int8` writes it (one calibration
        # method, and no accuracy bar: this 1-epoch model is for serving tests).
        int8 = Int8Options(methods=("MinMax",), tolerance=1.0) if model == "cnn" else None
        export_run(run_dir, root, name, int8=int8)
    write_version(root, "two_io", 1, two_io_model())
    write_version(
        root,
        "linear",
        1,
        linear_model(4, 5),
        labels=["a", "b", "c", "d", "e"],
        features=["w", "x", "y", "z"],
    )


@pytest.fixture(scope="session")
def model_store(build_once: Callable[[str, Callable[[Path], None]], Path]) -> ModelStore:
    """Trained once per test run, whatever the number of xdist workers; read-only (copy it)."""
    base = build_once("store", train_store)
    return ModelStore(base / "models", {name: base / "runs" / name for name, *_ in STORE_MODELS})


# -- live servers ------------------------------------------------------------


@pytest.fixture(scope="session")
def server(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """The shared server: read-only use (tests that change the repository use fresh_server)."""
    repo = model_store.copy_to(tmp_path_factory.mktemp("shared") / "models")
    with live_server(server_settings(repo)) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def fresh_server(model_store: ModelStore, tmp_path: Path) -> Callable[..., Any]:
    """A factory: ``with fresh_server(repo=None, **settings) as live`` runs a server of its own,
    over ``repo`` or else a private copy of the store."""

    @contextmanager
    def start(
        repo: Path | None = None, wait_ready: bool = True, **overrides: Any
    ) -> Iterator[LiveServer]:
        repo = repo or model_store.copy_to(tmp_path / "models")
        with live_server(server_settings(repo, **overrides), wait_ready) as live:
            yield live

    return start


@dataclass(frozen=True)
class Builders:
    """Hand-built ONNX models and the repository writer, for tests that need no training."""

    write_version: Callable[..., Path] = write_version
    linear_model: Callable[..., onnx.ModelProto] = linear_model
    two_io_model: Callable[[], onnx.ModelProto] = two_io_model


@pytest.fixture(scope="session")
def build() -> Builders:
    return Builders()
