"""A user's own CSV and .npz files: blank lines, index columns, short rows, bad values,
label order and feature names (files written here, as a user would)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from training.data import DatasetError, load_dataset
from training.user_data import label_order

LABELS = ("cat", "dog", "bird")


def write_csv(path: Path, rows: int = 30, *, index: str | None = None, end: str = "\n") -> Path:
    """``a,b,species`` rows (``index``: a first header cell, pandas' index values 0..N-1)."""
    head = ([index] if index is not None else []) + ["a", "b", "species"]
    lines = [",".join(head)]
    for i in range(rows):
        cells = [str(i)] if index is not None else []
        lines.append(",".join([*cells, f"{i * 0.5}", f"{(i * 7) % 5}", LABELS[i % 3]]))
    path.write_text("\n".join(lines) + end)
    return path


def load(path: Path):
    return load_dataset("file", path=path, label_column="species")


@pytest.mark.parametrize("end", ["\n\n", "\n\n\n", "\n  \n", "\r\n\r\n"])
def test_blank_lines_at_the_end_are_skipped(tmp_path: Path, end: str) -> None:
    ds = load(write_csv(tmp_path / "d.csv", end=end))
    assert len(ds.X_train) + len(ds.X_val) + len(ds.X_test) == 30
    assert ds.features == ["a", "b"]


def test_blank_lines_in_the_middle_are_skipped(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:5], "", ",,", *lines[5:]]) + "\n")
    ds = load(path)
    assert len(ds.X_train) + len(ds.X_val) + len(ds.X_test) == 30


@pytest.mark.parametrize("index", ["", "Unnamed: 0"])
def test_pandas_index_column_is_dropped_with_a_warning(
    tmp_path: Path, index: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="training"):
        ds = load(write_csv(tmp_path / "d.csv", index=index))
    assert ds.input_shape == (2,)
    assert ds.features == ["a", "b"]
    assert any(
        "has no name" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records
    )
    # Values come from columns a and b, not from the index.
    all_x = np.concatenate([ds.X_train, ds.X_val, ds.X_test])
    assert sorted(all_x[:, 0].tolist()) == [i * 0.5 for i in range(30)]


def test_a_named_first_column_is_a_feature(tmp_path: Path) -> None:
    ds = load(write_csv(tmp_path / "d.csv", index="row"))
    assert ds.features == ["row", "a", "b"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: lines.__setitem__(5, "2.0,1"), "d.csv, line 6: 2 values, the header has 3"),
        (
            lambda lines: lines.__setitem__(4, "2.0,abc,cat"),
            "d.csv, line 5, column 'b': 'abc' is not a number",
        ),
        (lambda lines: lines.__setitem__(3, "2.0,,cat"), "d.csv, line 4, column 'b': '' is not"),
        (
            lambda lines: lines.__setitem__(7, "nan,1,cat"),
            "d.csv, line 8, column 'a': 'nan' is not",
        ),
        (lambda lines: lines.__setitem__(2, "1,2,"), "d.csv, line 3: the label column 'species'"),
    ],
)
def test_bad_rows_name_file_line_and_column_in_one_line(tmp_path: Path, edit, message) -> None:
    path = write_csv(tmp_path / "d.csv")
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as info:
        load(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_string_labels_are_ordered_as_strings_and_numbers_numerically(tmp_path: Path) -> None:
    ds = load(write_csv(tmp_path / "d.csv"))
    assert ds.labels == ["bird", "cat", "dog"]
    assert label_order(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_order(["b10", "b2"]) == ["b10", "b2"]


def test_npz_names_the_first_bad_value_and_keeps_feature_names(tmp_path: Path) -> None:
    X = np.arange(40, dtype=np.float64).reshape(20, 2)
    X[7, 1] = np.inf
    np.savez(tmp_path / "bad.npz", X=X, y=np.arange(20) % 2)
    with pytest.raises(DatasetError, match="infinite value at row 7, column 1"):
        load_dataset("file", path=tmp_path / "bad.npz")
    X[7, 1] = 0
    names = np.array(["height", "weight"])
    np.savez(tmp_path / "ok.npz", X=X, y=np.arange(20) % 2, feature_names=names)
    assert load_dataset("file", path=tmp_path / "ok.npz").features == ["height", "weight"]
