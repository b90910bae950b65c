"""A user's own data: ``.npz`` (arrays ``X``, ``y``) and CSV files, read into arrays.

Every problem raises :class:`DatasetError` with one line that names the file,
and for a bad value its row (the file's line number, 1-based, header included)
and column. The rules, documented in the README ("Your own data"):

- CSV: the first row is the header; blank lines are skipped; every other row
  has one value per header column. A first column with no name (``""`` or
  pandas' ``Unnamed: 0``) is the index ``DataFrame.to_csv`` writes: it is
  dropped with a warning (name it in the header to keep it as a feature).
- Labels (the CSV label column, or ``.npz`` ``y``) are ordered, and numbered
  ``0..C-1`` in that order, by :func:`label_order`: numerically when every label
  is a number, else as strings (Unicode code-point order, so ``bird, cat, dog``).
  Output column ``i`` of the model's logits is ``labels[i]``.
- Feature names are the CSV header's columns without the label (and index)
  column, in file order; an ``.npz`` may name its features in an optional
  ``feature_names`` array, else it has none.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# A header cell pandas writes for an unnamed index ("" or "Unnamed: 0").
INDEX_HEADER = re.compile(r"(Unnamed: ?0)?")


class DatasetError(ValueError):
    """Bad dataset name or user data; the message is one line a user can act on."""


@dataclass
class UserData:
    """Arrays read from a user's file: ``X`` float32 ``(N, ...)``, ``y`` int64 ``(N,)``."""

    X: np.ndarray
    y: np.ndarray
    labels: list[str]  # labels[i] is class i
    features: list[str]  # names of X's columns, in order ([] when the file names none)


def label_order(raw: list[str]) -> list[str]:
    """The distinct labels in class order: numeric order when all parse as numbers
    (``2 < 10``), else string order (``bird < cat < dog``)."""
    distinct = set(raw)
    try:
        numbers = {label: float(label) for label in distinct}
    except ValueError:
        return sorted(distinct)
    return sorted(distinct, key=lambda label: (numbers[label], label))


def encode_labels(raw: list[str]) -> tuple[np.ndarray, list[str]]:
    """``(y, labels)``: ``y[i]`` is the class number of ``raw[i]`` in :func:`label_order`."""
    labels = label_order(raw)
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index[r] for r in raw], dtype=np.int64), labels


def _first_bad(X: np.ndarray) -> str:
    """Where the first NaN or infinite value of ``X`` is (row = sample, 0-based)."""
    at = np.argwhere(~np.isfinite(X))[0]
    column = f", column {at[1]}" if len(at) > 1 else ""
    return f"row {at[0]}{column}"


def load_npz(path: Path) -> UserData:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("X", "y") if k not in archive.files]
            if missing:
                raise DatasetError(
                    f"{path}: missing array(s) {', '.join(missing)}; "
                    f"expected arrays 'X' and 'y', found {archive.files}"
                )
            X, raw_y = archive["X"], archive["y"]
            names = archive["feature_names"] if "feature_names" in archive.files else None
    except (OSError, ValueError) as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f"{path}: not a readable .npz file ({err})") from err
    if not np.issubdtype(X.dtype, np.number) or X.dtype == np.bool_:
        raise DatasetError(f"{path}: X must be numeric, got dtype {X.dtype}")
    if X.ndim >= 1 and not np.isfinite(X).all():
        raise DatasetError(f"{path}: X holds a NaN or infinite value at {_first_bad(X)}")
    features = [str(n) for n in names.reshape(-1)] if names is not None else []
    if features and (X.ndim != 2 or len(features) != X.shape[1]):
        raise DatasetError(
            f"{path}: feature_names has {len(features)} names for X of shape {list(X.shape)}"
        )
    y, labels = encode_labels([str(v) for v in raw_y.reshape(-1)])
    return UserData(X.astype(np.float32), y, labels, features)


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, cells)`` of every non-blank row."""
    try:
        with path.open(newline="") as fh:
            reader = csv.reader(fh)
            return [
                (reader.line_num, row)
                for row in reader
                if any(cell.strip() for cell in row)  # blank lines, and ",,," rows
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"{path}: cannot read CSV ({err})") from err


def load_csv(path: Path, label_column: str) -> UserData:
    rows = _rows(path)
    if len(rows) < 2:
        raise DatasetError(f"{path}: CSV needs a header row and at least one data row")
    (_, header), body = rows[0], rows[1:]
    header = [h.strip() for h in header]
    if label_column not in header:
        raise DatasetError(f"{path}: no label column {label_column!r}; columns are {header}")
    li = header.index(label_column)
    dropped = {0} if INDEX_HEADER.fullmatch(header[0]) and li != 0 else set()
    if dropped:
        log.warning(
            "%s: the first column has no name (a pandas index?): dropped; "
            "name it in the header to use it as a feature",
            path,
        )
    feature_columns = [j for j in range(len(header)) if j != li and j not in dropped]
    unnamed = [j for j in feature_columns if not header[j]]
    if unnamed:
        raise DatasetError(f"{path}: column {unnamed[0] + 1} has no name in the header")
    X = np.empty((len(body), len(feature_columns)), dtype=np.float32)
    raw_y: list[str] = []
    for i, (line, row) in enumerate(body):
        if len(row) != len(header):
            raise DatasetError(
                f"{path}, line {line}: {len(row)} values, the header has {len(header)} columns"
            )
        label = row[li].strip()
        if not label:
            raise DatasetError(f"{path}, line {line}: the label column {label_column!r} is empty")
        raw_y.append(label)
        for k, j in enumerate(feature_columns):
            try:
                X[i, k] = float(row[j])
            except ValueError:
                raise DatasetError(
                    f"{path}, line {line}, column {header[j]!r}: {row[j]!r} is not a number "
                    "(feature columns must be numeric)"
                ) from None
            if not np.isfinite(X[i, k]):
                raise DatasetError(
                    f"{path}, line {line}, column {header[j]!r}: {row[j]!r} is not finite"
                )
    y, labels = encode_labels(raw_y)
    return UserData(X, y, labels, [header[j] for j in feature_columns])
