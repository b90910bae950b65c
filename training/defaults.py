"""The default models that ``make run`` trains and exports when the repository lacks them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from foldserve.model_format import version_numbers
from training.export import ExportResult, export_run
from training.train import DatasetSpec, TrainConfig, load_run, save_run, train
from training.zoo import NetworkConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefaultModel:
    name: str
    model: str
    dataset: DatasetSpec
    train: TrainConfig
    options: dict[str, object] = field(default_factory=dict)


DEFAULT_MODELS = (
    DefaultModel("digits_cnn", "cnn", DatasetSpec("digits"), TrainConfig(epochs=10)),
    # Gemm+BatchNormalization: the pattern ONNX Runtime does not fuse by itself.
    DefaultModel(
        "breast_cancer_mlp",
        "mlp",
        DatasetSpec("breast_cancer"),
        TrainConfig(epochs=30, batch_size=32, lr=1e-3),
        {"width": 64, "depth": 2},
    ),
    # A heavier network for latency work; BN statistics come from training on this data.
    DefaultModel(
        "resnet_bench",
        "resnet",
        DatasetSpec("synthetic", shape=[3, 32, 32], num_classes=10, n_samples=1200),
        TrainConfig(epochs=2, batch_size=64),
    ),
)


def train_default(spec: DefaultModel, runs: Path, progress: bool = True) -> Path:
    """Train one default model into ``runs/<name>`` (reused when already there)."""
    out = runs / spec.name
    if (out / "model.pt").is_file():
        load_run(out)  # fails loudly if the run is stale or broken
        return out
    ds = spec.dataset.load()
    cfg = NetworkConfig(spec.model, ds.input_shape, ds.num_classes, **spec.options)  # type: ignore[arg-type]
    result = train(cfg, ds, spec.train, progress=progress)
    save_run(out, result, cfg, spec.dataset, spec.train, ds.labels, ds.features)
    log.info(
        "%s: test_accuracy=%.4f in %.1f s",
        spec.name,
        result.metrics["test_accuracy"],
        result.metrics["seconds"],
    )
    return out


def ensure_default_models(
    repository: Path, runs: Path, progress: bool = True
) -> list[ExportResult]:
    """Train and export each default model that ``repository`` has no version of."""
    done = []
    for spec in DEFAULT_MODELS:
        if version_numbers(repository / spec.name):
            log.info("%s: already in %s, skipped", spec.name, repository)
            continue
        run = train_default(spec, runs, progress)
        done.append(export_run(run, repository, spec.name))
    return done
