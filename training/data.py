"""Datasets and splits for FoldServe's training side.

Every dataset is returned as a :class:`Dataset` holding seeded, stratified
train/val/test splits of *raw* features. Standardization statistics are fitted
on the training split only; the model applies them in its first layer
(:class:`training.zoo.Standardize`), so an exported model takes raw features.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.model_selection import train_test_split

BUILTIN_DATASETS = ("digits", "breast_cancer", "wine", "synthetic")


class DatasetError(ValueError):
    """Bad dataset name or user data; the message is one line a user can act on."""


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
    labels: list[str]
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


def _encode_labels(raw: np.ndarray) -> tuple[np.ndarray, list[str]]:
    classes, y = np.unique(raw, return_inverse=True)
    return y.astype(np.int64), [str(c) for c in classes]


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("X", "y") if k not in archive.files]
            if missing:
                raise DatasetError(
                    f"{path}: missing array(s) {', '.join(missing)}; "
                    f"expected arrays 'X' and 'y', found {archive.files}"
                )
            X, raw_y = archive["X"], archive["y"]
    except (OSError, ValueError) as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f"{path}: not a readable .npz file ({err})") from err
    if not np.issubdtype(X.dtype, np.number) or X.dtype == np.bool_:
        raise DatasetError(f"{path}: X must be numeric, got dtype {X.dtype}")
    y, labels = _encode_labels(raw_y.reshape(-1))
    return X.astype(np.float32), y, labels


def _load_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as err:
        raise DatasetError(f"{path}: cannot read CSV ({err})") from err
    if len(rows) < 2:
        raise DatasetError(f"{path}: CSV needs a header row and at least one data row")
    header, body = rows[0], rows[1:]
    if label_column not in header:
        raise DatasetError(f"{path}: no label column {label_column!r}; columns are {header}")
    li = header.index(label_column)
    raw_y = np.array([r[li] for r in body])
    feats = [[v for j, v in enumerate(r) if j != li] for r in body]
    try:
        X = np.array(feats, dtype=np.float32)
    except ValueError as err:
        raise DatasetError(f"{path}: feature columns must be numeric ({err})") from err
    y, labels = _encode_labels(raw_y)
    return X, y, labels


def load_user_data(path: Path, label_column: str | None, seed: int) -> Dataset:
    """Load ``.npz`` (arrays ``X`` and ``y``) or CSV (``label_column`` required)."""
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if path.suffix == ".npz":
        X, y, labels = _load_npz(path)
    elif path.suffix == ".csv":
        if not label_column:
            raise DatasetError(f"{path}: a CSV needs --label-column naming the label column")
        X, y, labels = _load_csv(path, label_column)
    else:
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use .npz or .csv")
    if len(X) != len(y):
        raise DatasetError(f"{path}: X has {len(X)} rows but y has {len(y)}")
    if X.ndim < 2:
        raise DatasetError(f"{path}: X must be (N, features...) with N samples, got {X.shape}")
    if not np.isfinite(X).all():
        raise DatasetError(f"{path}: X holds NaN or infinite values")
    counts = np.bincount(y)
    if len(labels) < 2 or counts.min() < 5:
        raise DatasetError(
            f"{path}: need at least 2 classes with 5 samples each for stratified splits, "
            f"got class counts {dict(zip(labels, counts.tolist(), strict=True))}"
        )
    return _split(path.stem, X, y, labels, seed)


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
        return _split(name, bunch.data, bunch.target, [str(t) for t in bunch.target_names], seed)
    if name == "wine":
        bunch = load_wine()
        return _split(name, bunch.data, bunch.target, [str(t) for t in bunch.target_names], seed)
    if name == "synthetic":
        X, y = synthetic_arrays(shape, num_classes, n_samples, seed)
        return _split(name, X, y, [f"class_{i}" for i in range(num_classes)], seed)
    raise DatasetError(
        f"unknown dataset {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}, "
        "or pass --data PATH for a .npz/.csv file"
    )
