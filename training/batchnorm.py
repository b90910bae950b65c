"""Batch Normalization from the formula, matching ``torch.nn.BatchNorm{1,2,3}d`` exactly.

This is the reference that folding must reproduce. In training mode, over the
batch (and spatial) axes, per channel::

    mu_B    = mean(x)
    var_B   = mean((x - mu_B) ** 2)                 # biased: used to normalize
    x_hat   = (x - mu_B) / sqrt(var_B + eps)
    y       = gamma * x_hat + beta                  # gamma=1, beta=0 when affine=False
    running_mean <- (1 - m) * running_mean + m * mu_B
    running_var  <- (1 - m) * running_var  + m * var_B * n / (n - 1)   # unbiased

with ``n`` the number of values per channel and ``m`` the momentum; when
``momentum is None`` it is ``1 / num_batches_tracked`` (a cumulative average).
In eval mode (with running statistics tracked) the layer is the per-channel
affine map that folding bakes into the neighbouring layer::

    y = s * x + t,   s = gamma / sqrt(running_var + eps),   t = beta - s * running_mean

With ``track_running_stats=False`` the layer uses batch statistics in eval mode
too, so it is *not* an affine map and cannot be folded.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norm_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``(scale, shift)``, computed in float64. Shapes: ``(C,)`` each."""
    var = running_var.detach().to(torch.float64)
    mean = running_mean.detach().to(torch.float64)
    gamma = torch.ones_like(var) if weight is None else weight.detach().to(torch.float64)
    beta = torch.zeros_like(var) if bias is None else bias.detach().to(torch.float64)
    scale = gamma / torch.sqrt(var + eps)
    return scale, beta - scale * mean


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give every torch BN in ``model`` random running statistics and affine parameters, in place.

    A freshly built network's BNs are identities in eval mode (mean 0, var 1,
    gamma 1, beta 0), so a wrong fold would go unseen; tests and benchmarks draw
    mean ~ N(0, 1), var ~ U(0.5, 2), gamma ~ N(1, 0.3^2), beta ~ N(0, 0.3^2) instead.
    """
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _BatchNorm):
                continue
            n = m.num_features
            if m.running_mean is not None and m.running_var is not None:
                m.running_mean.copy_(torch.randn(n, generator=generator))
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            if m.weight is not None and m.bias is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=generator))
                m.bias.copy_(0.3 * torch.randn(n, generator=generator))


class ScratchBatchNorm(nn.Module):
    """BN over dim 1 of ``(N, C)`` or ``(N, C, *spatial)`` inputs, written from the formula."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = nn.Parameter(torch.ones(num_features, dtype=dtype)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features, dtype=dtype)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, dtype=dtype))
            self.register_buffer("running_var", torch.ones(num_features, dtype=dtype))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"expected input (N, {self.num_features}, ...), got shape {tuple(x.shape)}"
            )
        axes = [0, *range(2, x.dim())]
        bshape = [1, -1] + [1] * (x.dim() - 2)  # (1, C, 1, ...)
        use_batch = self.training or self.running_mean is None
        if use_batch:
            n = x.numel() // x.shape[1]
            if self.training and n <= 1:
                raise ValueError(
                    f"BatchNorm needs more than 1 value per channel in training, got input "
                    f"shape {tuple(x.shape)}: use a batch of at least 2"
                )
            mean = x.mean(dim=axes)
            var = ((x - mean.view(bshape)) ** 2).mean(dim=axes)  # biased
            if self.training and self.running_mean is not None:
                self._update_running(mean, var, n)
        else:
            assert self.running_mean is not None and self.running_var is not None
            mean, var = self.running_mean, self.running_var
        y = (x - mean.view(bshape)) / torch.sqrt(var.view(bshape) + self.eps)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight.view(bshape) + self.bias.view(bshape)
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked += 1
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * n / (n - 1)
        self.running_mean.mul_(1 - m).add_(m * mean)
        self.running_var.mul_(1 - m).add_(m * unbiased)
