"""The weight math of folding, in float64: a per-channel affine map ``y = s * x + t`` merged
into the layer before it ("backward") or after it ("forward"). Pure functions from arrays to
arrays; the caller rounds the results to the model's dtype once.

Shapes: ``s`` and ``t`` are ``(C,)`` vectors over the channel the layer produces (backward)
or reads (forward)."""

from __future__ import annotations

import numpy as np


def batchnorm_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """ONNX BatchNormalization at inference, ``gamma * (x - mean) / sqrt(var + eps) + beta``,
    as ``(s, t)``."""
    s = gamma / np.sqrt(var + epsilon)
    return s, beta - s * mean


def conv_backward(
    w: np.ndarray, b: np.ndarray, s: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Conv ``W (Cout, Cin/g, *k)``, bias ``(Cout,)`` followed by ``s * y + t``."""
    return w * s.reshape(-1, *[1] * (w.ndim - 1)), s * b + t


def conv_transpose_backward(
    w: np.ndarray, b: np.ndarray, s: np.ndarray, t: np.ndarray, group: int
) -> tuple[np.ndarray, np.ndarray]:
    """ConvTranspose ``W (Cin, Cout/g, *k)``: output channel ``gi * Cout/g + j`` is made by
    the group ``gi`` slice of the input channels and column ``j`` of ``W``."""
    cin, cout_g = w.shape[:2]
    k = w.shape[2:]
    wg = w.reshape(group, cin // group, cout_g, *k)  # (g, Cin/g, Cout/g, *k)
    sg = s.reshape(group, 1, cout_g, *[1] * len(k))
    return (wg * sg).reshape(w.shape), s * b + t


def gemm_backward(
    b_mat: np.ndarray,
    c: np.ndarray | None,
    s: np.ndarray,
    t: np.ndarray,
    alpha: float,
    beta: float,
    trans_b: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Gemm ``alpha * A B' + beta * C`` (``B'`` is ``B (K, N)`` or ``B.T`` when transB)
    followed by ``s * y + t`` over N: returns ``B``, ``C`` for alpha = beta = 1."""
    scale = alpha * (s[:, None] if trans_b else s[None, :])
    bias = t if c is None else beta * c * s + t
    return b_mat * scale, bias


def matmul_backward(
    w: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """MatMul ``x @ W (.., K, N)`` (+ bias over N) followed by ``s * y + t`` over N."""
    return w * s, t if bias is None else s * bias + t


def conv_forward(
    w: np.ndarray, b: np.ndarray, s: np.ndarray, t: np.ndarray, group: int
) -> tuple[np.ndarray, np.ndarray]:
    """``s * x + t`` over input channels, then an unpadded Conv ``W (Cout, Cin/g, *k)``.
    Output channel ``o`` of group ``gi = o // (Cout/g)`` reads input channels
    ``gi * Cin/g ...``; with no padding every tap sees ``t``, so it becomes bias."""
    cout, cin_g = w.shape[:2]
    k = w.shape[2:]
    wg = w.reshape(group, cout // group, cin_g, *k)  # (g, Cout/g, Cin/g, *k)
    sg = s.reshape(group, 1, cin_g, *[1] * len(k))
    tg = t.reshape(group, 1, cin_g, *[1] * len(k))
    extra = (wg * tg).reshape(cout, -1).sum(axis=1)
    return (wg * sg).reshape(w.shape), b + extra


def gemm_forward(
    b_mat: np.ndarray,
    c: np.ndarray | None,
    s: np.ndarray,
    t: np.ndarray,
    alpha: float,
    beta: float,
    trans_b: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``s * A + t`` over K, then Gemm (transA = 0): returns ``B``, ``C`` for
    alpha = beta = 1."""
    b_kn = b_mat.T if trans_b else b_mat  # (K, N)
    new_kn = alpha * s[:, None] * b_kn
    extra = alpha * (t @ b_kn)  # (N,)
    bias = extra if c is None else beta * c + extra
    return (new_kn.T if trans_b else new_kn), bias


def matmul_forward(
    w: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``s * x + t`` over K, then ``x @ W (K, N)`` (+ bias over N)."""
    extra = t @ w
    return s[:, None] * w, extra if bias is None else bias + extra
