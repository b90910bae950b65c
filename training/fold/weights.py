"""Weight math for folding an eval-mode BN (``y = scale * x + shift`` per channel) into a layer.

Pure functions from tensors to tensors: no modules, no in-place updates. They
compute in the dtype they are given; :mod:`training.fold.rules` passes float64 copies
so that a later cast to the export dtype rounds once. ``scale`` and ``shift``
are ``(C,)`` tensors from :func:`training.batchnorm.batch_norm_affine`.

Weight layouts: Linear ``(out, in)``; Conv ``(out, in/groups, *k)``;
ConvTranspose ``(in, out/groups, *k)``, whose output channel ``o`` is
``g * (out/groups) + j`` for group ``g`` and column ``j`` of axis 1.
"""

from __future__ import annotations

import torch


def conv_padding_is_zero(
    padding: str | tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...]
) -> bool:
    """Whether a conv pads nothing, the condition for folding a BN forward into it exactly."""
    if isinstance(padding, str):  # "valid", or "same", which pads (k - 1) * d in total
        return padding == "valid" or all(
            d * (k - 1) == 0 for d, k in zip(dilation, kernel_size, strict=True)
        )
    return all(p == 0 for p in padding)


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast to floating ``dtype`` with a single rounding: the nearest value, ties to even.

    torch casts float64 to float16 and bfloat16 through float32, rounding twice; when
    the float32 rounding lands on a tie of the narrow type, the result is one step
    off the nearest value (a few weights in 10^4 of a folded ResNet). Those are
    stepped back here.
    """
    y = x.to(dtype)
    if x.dtype != torch.float64 or not dtype.is_floating_point or torch.finfo(dtype).bits >= 32:
        return y
    toward = torch.where(x > y.to(x.dtype), torch.inf, -torch.inf).to(dtype)
    z = torch.nextafter(y, toward)  # the other candidate: one step from y toward x
    closer = (z.to(x.dtype) - x).abs() < (y.to(x.dtype) - x).abs()
    return torch.where(closer & y.isfinite(), z, y)


def _bias_or_zeros(w: torch.Tensor, b: torch.Tensor | None, channels: int) -> torch.Tensor:
    return torch.zeros(channels, dtype=w.dtype, device=w.device) if b is None else b


def fold_conv_bn_weights(
    w: torch.Tensor,
    b: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    transpose: bool,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a BN that follows a (transposed) conv, or a Linear (``transpose=False, groups=1``).

    Returns ``(w', b')`` with ``w'`` in ``w``'s layout and ``b' = scale * b + shift``
    (``b=None`` is a zero bias), so that ``layer'(x) == bn(layer(x))`` in eval mode.
    """
    out_channels = scale.shape[0]
    if transpose:
        cin, per_group = w.shape[0], w.shape[1]  # (in, out/groups, *k)
        if per_group * groups != out_channels:
            raise ValueError(
                f"ConvTranspose weight {tuple(w.shape)} with groups={groups} does "
                f"not give {out_channels} output channels"
            )
        s = scale.reshape(groups, 1, per_group, *([1] * (w.dim() - 2)))
        w_new = (w.reshape(groups, cin // groups, *w.shape[1:]) * s).reshape(w.shape)
    else:
        if w.shape[0] != out_channels:
            raise ValueError(f"weight {tuple(w.shape)} does not have {out_channels} outputs")
        w_new = w * scale.reshape(-1, *([1] * (w.dim() - 1)))  # scale row o by scale[o]
    b_new = scale * _bias_or_zeros(w, b, out_channels) + shift
    return w_new, b_new


def fold_linear_bn_weights(
    w: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a BN1d after a Linear on ``(N, C)`` activations: ``W' = s W``, ``b' = s b + t``."""
    return fold_conv_bn_weights(w, b, scale, shift, transpose=False, groups=1)


def fold_bn_into_next_linear(
    w: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a BN on ``(N, in)`` activations into the Linear after it.

    ``W(s*x + t) + b = (W * s) x + (b + W t)``: column ``i`` is scaled by ``s[i]``.
    """
    if w.shape[1] != scale.shape[0]:
        raise ValueError(f"Linear weight {tuple(w.shape)} does not take {scale.shape[0]} inputs")
    return w * scale.reshape(1, -1), _bias_or_zeros(w, b, w.shape[0]) + w @ shift


def fold_bn_into_next_conv(
    w: torch.Tensor,
    b: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a BN into the following conv; exact only when that conv has zero padding.

    With zero padding every output position sees a full kernel window of BN
    outputs, so the shift contributes the same ``sum_{i,k} W[o,i,k] * t[i]`` to
    every position of output ``o``. Output ``o`` of group ``g`` reads input
    channels ``g * (in/groups) + i`` for ``i`` in its ``in/groups`` weight columns.
    """
    out_channels, per_group = w.shape[0], w.shape[1]  # (out, in/groups, *k)
    if per_group * groups != scale.shape[0] or out_channels % groups:
        raise ValueError(
            f"conv weight {tuple(w.shape)} with groups={groups} does not take "
            f"{scale.shape[0]} input channels"
        )
    s = scale.reshape(groups, per_group).repeat_interleave(out_channels // groups, dim=0)
    t = shift.reshape(groups, per_group).repeat_interleave(out_channels // groups, dim=0)
    spatial = [1] * (w.dim() - 2)
    w_new = w * s.reshape(out_channels, per_group, *spatial)  # (out, in/groups, *k)
    kernel_sums = w.reshape(out_channels, per_group, -1).sum(dim=2)  # (out, in/groups)
    b_new = _bias_or_zeros(w, b, out_channels) + (kernel_sums * t).sum(dim=1)
    return w_new, b_new
