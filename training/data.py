"""Datasets and splits for FoldServe's training side.

Every dataset is returned as a :class:`Dataset` holding seeded, stratified
train/val/test splits of *raw* features. Standardization statistics are fitted
on the training split only; the model applies them in its first layer
(:class:`training.zoo.Standardize`), so an exported model takes raw features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.model_selection import train_test_split

from training.user_data import DatasetError, UserData, load_csv, load_npz

BUILTIN_DATASETS = ("digits", "breast_cancer", "wine", "synthetic")


__all__ = ["BUILTIN_DATASETS", "Dataset", "DatasetError", "load_dataset", "parse_shape"]


@dataclass
class Dataset:
    """Splits of one dataset. ``X_*`` are float32 with shape ``(N, *input_shape)``."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    labels: list[str]  # labels[i] is class i (output column i)
    features: list[str] = field(default_factory=list)  # X's column names, when known
    input_shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.X_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def standardization(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std fitted on the training split only.

        Vectors (``(F,)``) get per-feature statistics; images (``(C, ...)``) get
        per-channel statistics, shaped to broadcast over ``(C, 1, ...)``.
        A constant feature gets std 1 so it maps to 0 rather than dividing by 0.
        """
        x = self.X_train.astype(np.float64)
        if len(self.input_shape) == 1:
            mean, std = x.mean(axis=0), x.std(axis=0)
        else:
            axes = (0, *range(2, x.ndim))
            keep = (self.input_shape[0],) + (1,) * (len(self.input_shape) - 1)
            mean = x.mean(axis=axes).reshape(keep)
            std = x.std(axis=axes).reshape(keep)
        std = np.where(std < 1e-8, 1.0, std)
        return mean.astype(np.float32), std.astype(np.float32)


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"3x32x32"`` or ``"20"`` into a shape tuple."""
    try:
        shape = tuple(int(p) for p in text.lower().split("x"))
    except ValueError as err:
        raise DatasetError(f"bad shape {text!r}: expected e.g. '3x32x32' or '20'") from err
    if not shape or any(d <= 0 for d in shape):
        raise DatasetError(f"bad shape {text!r}: every dimension must be a positive integer")
    return shape


def _split(
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    labels: list[str],
    seed: int,
    features: list[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
) -> Dataset:
    X_rest, X_test, y_rest, y_test = train_test_split(
        X, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    X_train, X_val, y_train, y_val = train_test_split(
        X_rest,
        y_rest,
        test_size=val_fraction / (1 - test_fraction),
        random_state=seed,
        stratify=y_rest,
    )
    return Dataset(
        name,
        X_train.astype(np.float32),
        y_train.astype(np.int64),
        X_val.astype(np.float32),
        y_val.astype(np.int64),
        X_test.astype(np.float32),
        y_test.astype(np.int64),
        labels,
        features or [],
    )


def synthetic_arrays(
    shape: tuple[int, ...], num_classes: int, n_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Learnable random data: each class is a random prototype plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(0.0, 1.0, size=(num_classes, *shape))
    y = np.arange(n_samples) % num_classes
    rng.shuffle(y)
    X = prototypes[y] * 0.5 + rng.normal(0.0, 1.0, size=(n_samples, *shape))
    return (X * 2.0 + 1.0).astype(np.float32), y.astype(np.int64)


def load_user_data(path: Path, label_column: str | None, seed: int) -> Dataset:
    """Load ``.npz`` (arrays ``X`` and ``y``) or CSV (``label_column`` required); the
    rules are in :mod:`training.user_data`."""
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    data: UserData
    if path.suffix == ".npz":
        data = load_npz(path)
    elif path.suffix == ".csv":
        if not label_column:
            raise DatasetError(f"{path}: a CSV needs --label-column naming the label column")
        data = load_csv(path, label_column)
    else:
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use .npz or .csv")
    X, y, labels = data.X, data.y, data.labels
    if len(X) != len(y):
        raise DatasetError(f"{path}: X has {len(X)} rows but y has {len(y)}")
    if X.ndim < 2:
        raise DatasetError(f"{path}: X must be (N, features...) with N samples, got {X.shape}")
    counts = np.bincount(y)
    if len(labels) < 2 or counts.min() < 5:
        raise DatasetError(
            f"{path}: need at least 2 classes with 5 samples each for stratified splits, "
            f"got class counts {dict(zip(labels, counts.tolist(), strict=True))}"
        )
    return _split(path.stem, X, y, labels, seed, data.features)


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    path: str | Path | None = None,
    label_column: str | None = None,
    shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    n_samples: int = 2000,
) -> Dataset:
    """Return seeded, stratified splits of a bundled, synthetic or user dataset.

    ``name`` is one of :data:`BUILTIN_DATASETS`, or ``"file"`` with ``path``.
    Raises :class:`DatasetError` naming the valid choices on a bad name.
    """
    if path is not None or name == "file":
        if path is None:
            raise DatasetError("dataset 'file' needs --data PATH (.npz or .csv)")
        return load_user_data(Path(path), label_column, seed)
    if name == "digits":
        bunch = load_digits()
        X = bunch.data.reshape(-1, 1, 8, 8)
        return _split(name, X, bunch.target, [str(t) for t in bunch.target_names], seed)
    if name == "breast_cancer":
        bunch = load_breast_cancer()
        labels = [str(t) for t in bunch.target_names]
        features = [str(f) for f in bunch.feature_names]
        return _split(name, bunch.data, bunch.target, labels, seed, features)
    if name == "wine":
        bunch = load_wine()
        labels = [str(t) for t in bunch.target_names]
        features = [str(f) for f in bunch.feature_names]
        return _split(name, bunch.data, bunch.target, labels, seed, features)
    if name == "synthetic":
        X, y = synthetic_arrays(shape, num_classes, n_samples, seed)
        return _split(name, X, y, [f"class_{i}" for i in range(num_classes)], seed)
    raise DatasetError(
        f"unknown dataset {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}, "
        "or pass --data PATH for a .npz/.csv file"
    )
