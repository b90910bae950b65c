"""BatchNorm over the global batch of all training processes, on any device and backend.

In training mode each BN layer of a data-parallel run normalizes with the mean
and variance of the *global* batch (the concatenation of every process's local
batch), and its running statistics follow those global values, as one process
trained on the whole batch would compute them. PyTorch's ``nn.SyncBatchNorm``
promises the same but refuses CPU tensors (torch 2.13: "SyncBatchNorm expected
input tensor to be on GPU"), so gloo runs on CPU could not use it; this module
does the reduction with ``torch.distributed.nn.functional.all_reduce``, which
autograd differentiates (its backward is an all-reduce of the gradients), so
the backward pass needs no hand-written kernel and is the same on gloo and NCCL.

One all-reduce per layer and pass carries ``2C + 1`` float64 values: per channel
``n_r * mean_r`` and ``M2_r + n_r * mean_r**2`` (``M2_r`` the local sum of
squared deviations from the local mean), and the sample count. Combining in
float64 from locally centred sums avoids the cancellation of a float32
``E[x^2] - E[x]^2``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class SyncBatchNorm(_BatchNorm):
    """BN whose training-mode statistics are those of the global batch.

    Same parameters, buffers and ``state_dict`` keys as ``nn.BatchNorm1d/2d/3d``,
    so a checkpoint loads into the plain network. Inputs are ``(N, C, *)``.
    Outside a process group of two or more, and in eval mode, it is plain BN.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        synced = (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )
        if not synced:
            return super().forward(input)
        mean, var, count = _global_moments(input)  # (C,), (C,) biased, scalar
        shape = (1, -1) + (1,) * (input.dim() - 2)
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        # As nn.BatchNorm does: momentum None means a cumulative average; the running
        # variance is the unbiased one (count / (count - 1)).
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1.0 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1.0 - factor).add_(unbiased, alpha=factor)


def _global_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel mean and biased variance of ``x`` over all processes, and the sample count.

    ``x`` is ``(N, C, *)``; the moments are ``(C,)`` in ``x``'s dtype and carry
    gradients to every process's input through the all-reduce.
    """
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    n = x.numel() // channels
    local_mean = x.mean(dims)  # (C,)
    centred = x - local_mean.view((1, -1) + (1,) * (x.dim() - 2))
    local_m2 = (centred * centred).sum(dims)  # (C,)
    mean64 = local_mean.double()
    local = torch.cat(
        [mean64 * n, local_m2.double() + n * mean64 * mean64, mean64.new_tensor([float(n)])]
    )
    total = dist_fn.all_reduce(local)  # type: ignore[no-untyped-call]  # (2C + 1,), summed
    count = float(total[-1].detach())
    mean = total[:channels] / count
    var = (total[channels : 2 * channels] / count - mean * mean).clamp_min(0.0)
    return mean.to(x.dtype), var.to(x.dtype), count


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a :class:`SyncBatchNorm`.

    The replacements share the originals' parameters and buffers (the network
    trains the same tensors); containers are changed in place and returned, as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does.
    """
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            sync.weight = module.weight
            sync.bias = module.bias
        sync.running_mean = module.running_mean
        sync.running_var = module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module
