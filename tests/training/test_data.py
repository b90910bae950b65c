"""Datasets: shapes, stratified seeded splits, train-only standardization, user-file errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data import DatasetError, load_dataset, parse_shape


@pytest.mark.parametrize(
    ("name", "shape", "classes", "total"),
    [("digits", (1, 8, 8), 10, 1797), ("breast_cancer", (30,), 2, 569), ("wine", (13,), 3, 178)],
)
def test_bundled_datasets(name, shape, classes, total):
    ds = load_dataset(name, seed=0)
    assert ds.input_shape == shape
    assert ds.num_classes == classes
    assert len(ds.X_train) + len(ds.X_val) + len(ds.X_test) == total
    # Stratified: each split's class proportions within 5 points of the whole.
    all_y = np.concatenate([ds.y_train, ds.y_val, ds.y_test])
    whole = np.bincount(all_y, minlength=classes) / len(all_y)
    for y in (ds.y_train, ds.y_val, ds.y_test):
        assert np.abs(np.bincount(y, minlength=classes) / len(y) - whole).max() < 0.05


def test_splits_are_seeded_and_disjoint():
    a, b, c = (
        load_dataset("wine", seed=3),
        load_dataset("wine", seed=3),
        load_dataset("wine", seed=4),
    )
    np.testing.assert_array_equal(a.X_test, b.X_test)
    assert not np.array_equal(a.X_test, c.X_test)
    rows = {r.tobytes() for r in a.X_train}
    assert not any(r.tobytes() in rows for r in a.X_test)


def test_standardization_is_fitted_on_train_only():
    ds = load_dataset("breast_cancer", seed=0)
    mean, std = ds.standardization()
    z = (ds.X_train - mean) / std
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-3)
    full_mean = np.concatenate([ds.X_train, ds.X_val, ds.X_test]).mean(0)
    assert not np.allclose(mean, full_mean, rtol=1e-6)


def test_image_standardization_is_per_channel():
    ds = load_dataset("synthetic", shape=(3, 6, 6), num_classes=4, n_samples=200)
    mean, std = ds.standardization()
    assert mean.shape == (3, 1, 1)
    z = (ds.X_train - mean) / std
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-4)


def test_synthetic_has_any_shape():
    ds = load_dataset("synthetic", shape=(7,), num_classes=3, n_samples=90)
    assert ds.input_shape == (7,)
    assert ds.num_classes == 3


def test_unknown_dataset_names_choices():
    with pytest.raises(DatasetError, match="digits, breast_cancer, wine, synthetic"):
        load_dataset("mnist")


def test_npz_user_data(tmp_path: Path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 4))
    y = np.array(["cat", "dog"] * 50)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    ds = load_dataset("file", path=tmp_path / "d.npz")
    assert ds.labels == ["cat", "dog"]
    assert ds.input_shape == (4,)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.zeros((10, 2))}, "missing array"),
        ({"X": np.zeros((10, 2)), "y": np.zeros(9)}, "X has 10 rows but y has 9"),
        ({"X": np.array([["a", "b"]] * 10), "y": np.arange(10) % 2}, "must be numeric"),
        ({"X": np.full((20, 2), np.nan), "y": np.arange(20) % 2}, "NaN"),
    ],
)
def test_bad_npz_gives_one_line_error(tmp_path: Path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset("file", path=tmp_path / "bad.npz")
    assert "\n" not in str(info.value)


def test_csv_user_data(tmp_path: Path):
    rows = ["a,b,label"] + [f"{i},{i * 2 % 7},{'x' if i % 2 else 'y'}" for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(rows))
    ds = load_dataset("file", path=tmp_path / "d.csv", label_column="label")
    assert ds.input_shape == (2,)
    assert ds.labels == ["x", "y"]
    with pytest.raises(DatasetError, match="no label column 'target'"):
        load_dataset("file", path=tmp_path / "d.csv", label_column="target")
    (tmp_path / "t.csv").write_text("a,label\nfoo,1\nbar,0\n")
    with pytest.raises(DatasetError, match="numeric"):
        load_dataset("file", path=tmp_path / "t.csv", label_column="label")


def test_parse_shape():
    assert parse_shape("3x32x32") == (3, 32, 32)
    with pytest.raises(DatasetError):
        parse_shape("3xa")
