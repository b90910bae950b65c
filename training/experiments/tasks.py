"""Datasets of the experiments beyond the bundled ones, built from bundled data (no downloads).

``digits_hard``: sklearn's 8x8 digits upsampled to ``size x size``, each image
drawn ``copies`` times with a random rotation, shift, Gaussian pixel noise and
an occluding square, so that small models stay well below 100% accuracy.
``digits_small``: the digits splits with the training split cut to ``n``
samples (stratified), for the regularization claim.
A seed fixes both the distortions and the split.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from training.data import Dataset, _split, load_dataset

HARD_SIZE = 12  # pixels per side of the harder image task
HARD_COPIES = 2  # distorted copies of each of the 1,797 digits
HARD_ROTATION = 25.0  # degrees, uniform in [-r, r]
HARD_NOISE = 0.15  # Gaussian pixel noise, as a fraction of the image range
HARD_OCCLUSION = 4  # side of the occluding square, in pixels of the upsampled image


def hard_digits(seed: int, size: int = HARD_SIZE, copies: int = HARD_COPIES) -> Dataset:
    """Distorted, upsampled digits: (N, 1, size, size) float32 in about [-0.5, 1.5], 10 classes."""
    bunch = load_digits()
    rng = np.random.default_rng(seed + 7_000)
    base = bunch.images / 16.0  # (1797, 8, 8) in [0, 1]
    zoomed = ndimage.zoom(base, (1, size / 8, size / 8), order=1)  # (1797, size, size)
    images, labels = [], []
    for _ in range(copies):
        for img, label in zip(zoomed, bunch.target, strict=True):
            out = ndimage.rotate(
                img, rng.uniform(-HARD_ROTATION, HARD_ROTATION), reshape=False, order=1
            )
            out = ndimage.shift(out, rng.integers(-1, 2, size=2), order=0)
            r, c = rng.integers(0, size - HARD_OCCLUSION + 1, size=2)
            out[r : r + HARD_OCCLUSION, c : c + HARD_OCCLUSION] = rng.uniform(0.0, 1.0)
            images.append(out + rng.normal(0.0, HARD_NOISE, size=out.shape))
            labels.append(label)
    X = np.stack(images)[:, None].astype(np.float32)  # (N, 1, size, size)
    names = [str(t) for t in bunch.target_names]
    return _split("digits_hard", X, np.asarray(labels), names, seed)


def small_training_split(data: Dataset, n: int, seed: int) -> Dataset:
    """``data`` with its training split cut to ``n`` stratified samples; val and test kept."""
    if n >= len(data.X_train):
        return data
    X, _, y, _ = train_test_split(
        data.X_train, data.y_train, train_size=n, random_state=seed, stratify=data.y_train
    )
    return Dataset(
        f"{data.name}_small",
        X,
        y,
        data.X_val,
        data.y_val,
        data.X_test,
        data.y_test,
        data.labels,
    )


def load_task(name: str, seed: int, small_train: int) -> Dataset:
    """A bundled dataset, ``digits_hard``, or ``digits_small`` (``small_train`` samples)."""
    if name == "digits_hard":
        return hard_digits(seed)
    if name == "digits_small":
        return small_training_split(load_dataset("digits", seed=seed), small_train, seed)
    return load_dataset(name, seed=seed)
