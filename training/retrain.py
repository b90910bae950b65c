"""Retrain a model with what its latest version recorded, and export the next version.

A version's ``metadata.json`` holds the network (``model_config``), the dataset
spec (``training.dataset``) and the training config (``training.config``; both
recorded by :func:`training.export.build_version`) and, when it has
``model.int8.onnx``, how that was made (``int8``: the next version gets one too, with
the same calibration size, methods and tolerance). :func:`plan_retrain` reads them
back, applies the caller's overrides and refuses, naming every missing key, a
version that lacks any of them (one exported before they were recorded).
:func:`train_plan` trains it into a run directory, which ``python -m training
retrain`` then exports with :func:`training.export.export_run`, as ``export`` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from foldserve.datatypes import NUMPY_DTYPES
from foldserve.model_format import ModelVersionError, VersionMetadata, version_numbers
from training.export import EXPORT_DTYPES
from training.int8_cli import options_of
from training.quantize import Int8Options
from training.train import DatasetSpec, TrainConfig, TrainResult, save_run, train
from training.zoo import NetworkConfig


class RetrainError(ValueError):
    """A model that cannot be retrained from its repository; nothing was trained or written."""


@dataclass(frozen=True)
class RetrainPlan:
    """What the next version of ``name`` is trained with: the base version's record,
    overrides applied."""

    name: str
    base_version: int
    model: NetworkConfig
    dataset: DatasetSpec
    train: TrainConfig
    dtype: torch.dtype
    int8: Int8Options | None = None  # the base version had model.int8.onnx: made the same way


def _section(
    training: dict[str, Any], key: str, cls: type[Any], overrides: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """``training[key]`` with ``overrides`` on top, and the ``cls`` fields still missing.

    A key ``cls`` does not know (a newer writer's) is an error rather than dropped:
    ignoring it would train something other than what was recorded.
    """
    recorded = training.get(key)
    if not isinstance(recorded, dict):
        return {}, [f"training.{key}"]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(recorded) - names)
    if unknown:
        raise RetrainError(
            f"training.{key} records {', '.join(unknown)}, which this trainer does not know"
        )
    merged = {**recorded, **overrides}
    return merged, [f"training.{key}.{n}" for n in sorted(names - set(merged))]


def plan_retrain(
    repository: Path,
    name: str,
    *,
    epochs: int | None = None,
    seed: int | None = None,
    data: Path | None = None,
) -> RetrainPlan:
    """The plan for retraining the latest version of ``repository/name``.

    ``seed`` replaces both the split seed and the training seed (as ``train --seed``
    does); ``data`` replaces the dataset by that .npz/.csv file (its label column
    stays the recorded one). Raises :class:`RetrainError`.
    """
    versions = version_numbers(repository / name)
    if not versions:
        raise RetrainError(
            f"{repository / name} has no version to retrain: export one first with "
            "`python -m training export`"
        )
    base = versions[-1]
    where = f"version {base} of {name}"
    try:
        md = VersionMetadata.read(repository / name / str(base))
    except ModelVersionError as err:
        raise RetrainError(f"{where}: {err}") from err
    dataset_overrides: dict[str, Any] = {} if seed is None else {"seed": seed}
    if data is not None:
        dataset_overrides.update(name="file", path=str(data))
    train_overrides: dict[str, Any] = {}
    if epochs is not None:
        train_overrides["epochs"] = epochs
    if seed is not None:
        train_overrides["seed"] = seed
    dataset, missing_data = _section(md.training, "dataset", DatasetSpec, dataset_overrides)
    config, missing_train = _section(md.training, "config", TrainConfig, train_overrides)
    missing = (["model_config"] if md.network is None else []) + missing_data + missing_train
    if missing:
        raise RetrainError(
            f"{where} cannot be retrained: its metadata.json lacks {', '.join(missing)} "
            "(versions exported before retrain support do not record how they were trained: "
            "train with `python -m training train` and `export` once, then retrain)"
        )
    datatype = md.inputs[0].datatype
    export_dtype = EXPORT_DTYPES.get(NUMPY_DTYPES[datatype].name)
    if export_dtype is None:
        raise RetrainError(f"{where} takes {datatype} inputs; export writes FP32 or FP16 only")
    assert md.network is not None  # checked with the rest of what is missing
    try:
        model = NetworkConfig.from_dict(md.network)
    except (KeyError, TypeError) as err:
        raise RetrainError(f"{where}: model_config is not a zoo config ({err})") from err
    return RetrainPlan(
        name,
        base,
        model,
        DatasetSpec(**dataset),
        TrainConfig(**config),
        export_dtype,
        None if md.int8 is None else options_of(md.int8),
    )


def train_plan(plan: RetrainPlan, run_dir: Path, progress: bool = True) -> TrainResult:
    """Train ``plan`` and save it as a run in ``run_dir``; raises :class:`RetrainError`
    when the data does not fit the network (``training.data.DatasetError`` when it
    cannot be read)."""
    ds = plan.dataset.load()
    if (ds.input_shape, ds.num_classes) != (plan.model.input_shape, plan.model.num_classes):
        raise RetrainError(
            f"the data has input shape {list(ds.input_shape)} and {ds.num_classes} classes; "
            f"version {plan.base_version} of {plan.name} takes "
            f"{list(plan.model.input_shape)} and {plan.model.num_classes}: a retrain keeps "
            "the network"
        )
    result = train(plan.model, ds, plan.train, progress=progress)
    save_run(run_dir, result, plan.model, plan.dataset, plan.train, ds.labels, ds.features)
    return result
