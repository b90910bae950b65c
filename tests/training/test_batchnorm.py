"""The from-scratch BN equals torch's BatchNorm in float64: outputs, gradients, running stats."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.batchnorm import ScratchBatchNorm, batch_norm_affine

SHAPES = {1: [(16, 5), (8, 5, 7)], 2: [(6, 5, 4, 3)]}
CASES = [
    (dim, shape, momentum, affine, track)
    for dim, shapes in SHAPES.items()
    for shape in shapes
    for momentum in (0.1, 0.3, None)
    for affine in (True, False)
    for track in (True, False)
]


def _pair(dim: int, momentum: float | None, affine: bool, track: bool, eps: float):
    cls = nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d
    ref = cls(5, eps=eps, momentum=momentum, affine=affine, track_running_stats=track).double()
    ours = ScratchBatchNorm(5, eps, momentum, affine, track, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            g = torch.randn(5, dtype=torch.float64) * 0.5 + 1
            b = torch.randn(5, dtype=torch.float64)
            ref.weight.copy_(g)
            ref.bias.copy_(b)
            ours.weight.copy_(g)  # type: ignore[union-attr]
            ours.bias.copy_(b)  # type: ignore[union-attr]
    return ref, ours


@pytest.mark.parametrize(("dim", "shape", "momentum", "affine", "track"), CASES)
def test_matches_torch_training_and_eval(dim, shape, momentum, affine, track):
    torch.manual_seed(0)
    eps = 1e-3
    ref, ours = _pair(dim, momentum, affine, track, eps)
    for step in range(4):
        x = (torch.randn(shape, dtype=torch.float64) * (step + 1) + step).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        y_ref, y_ours = ref(x), ours(x2)
        torch.testing.assert_close(y_ours, y_ref, atol=1e-6, rtol=0)
        grad_out = torch.randn_like(y_ref)
        y_ref.backward(grad_out)
        y_ours.backward(grad_out)
        torch.testing.assert_close(x2.grad, x.grad, atol=1e-6, rtol=0)
        if affine:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-6, rtol=0)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=1e-6, rtol=0)
            ref.weight.grad = ref.bias.grad = ours.weight.grad = ours.bias.grad = None
    if track:
        torch.testing.assert_close(ours.running_mean, ref.running_mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-6, rtol=0)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4
        # The running estimate has moved away from its (0, 1) start: the test can fail.
        assert float(ref.running_mean.abs().max()) > 0.1
    ref.eval()
    ours.eval()
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=0)


def test_cumulative_average_when_momentum_none():
    """momentum=None: running_mean is the plain average of the batch means."""
    ours = ScratchBatchNorm(3, momentum=None, dtype=torch.float64)
    means = []
    for k in range(5):
        x = torch.randn(32, 3, dtype=torch.float64) + k
        means.append(x.mean(0))
        ours(x)
    torch.testing.assert_close(ours.running_mean, torch.stack(means).mean(0), atol=1e-12, rtol=0)


def test_eval_mode_is_the_affine_map_folding_uses():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(4, eps=1e-2).double()
    bn.train()
    for _ in range(3):
        bn(torch.randn(8, 4, 3, 3, dtype=torch.float64) * 3 + 2)
    bn.eval()
    with torch.no_grad():
        bn.weight.mul_(-0.5)
    scale, shift = batch_norm_affine(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    expected = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    torch.testing.assert_close(bn(x), expected, atol=1e-12, rtol=0)


def test_single_sample_in_training_is_explained():
    bn = ScratchBatchNorm(3)
    with pytest.raises(ValueError, match="at least 2"):
        bn(torch.randn(1, 3))
