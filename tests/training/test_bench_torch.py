"""Eager PyTorch folded-vs-unfolded timing: real outputs, pairs, and the same speedup statistic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.bench_torch import bench_folding
from training.zoo import NetworkConfig, build_model


def test_bench_folding_times_both_variants_in_pairs() -> None:
    torch.manual_seed(0)
    model = build_model(NetworkConfig("cnn", (1, 8, 8), 10, width=8)).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    r = bench_folding(model, (1, 8, 8), batch_size=4, iterations=12, warmup=2)
    assert r.iterations == 12 and r.unfolded_s.shape == r.folded_s.shape == (12,)
    assert np.all(r.folded_s > 0) and np.all(r.unfolded_s > 0)
    assert 0 < r.max_abs_diff < 1e-4  # a real fold: not bit-identical, within rounding
    unfolded_ms, folded_ms = r.p50_ms()
    assert unfolded_ms == pytest.approx(np.median(r.unfolded_s) * 1e3)
    speedup = r.speedup()  # unfolded p50 / folded p50, with its paired interval
    assert speedup.ratio == pytest.approx(unfolded_ms / folded_ms)
    assert speedup.ci_low <= speedup.ratio <= speedup.ci_high
