"""Triton's classification extension: an output's top-K classes as ``score:index[:label]``."""

from __future__ import annotations

import numpy as np

from service.errors import BadRequest


def classify(scores: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Top-``k`` of the last axis as ``b"score:index[:label]"`` (Triton's format), highest first.

    ``scores`` of shape (..., C) gives an object array of shape (..., min(k, C)).
    """
    if scores.ndim == 0 or scores.shape[-1] == 0:
        raise BadRequest("classification needs an output with a class axis")
    rows = scores.reshape(-1, scores.shape[-1]).astype(np.float64)  # (R, C)
    k = min(k, rows.shape[1])
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]  # (R, k)
    out = np.empty(top.shape, dtype=object)
    for r, row in enumerate(top):
        for j, c in enumerate(row):
            label = f":{labels[c]}" if c < len(labels) else ""
            out[r, j] = f"{rows[r, c]:f}:{c}{label}".encode()
    return out.reshape((*scores.shape[:-1], k))
