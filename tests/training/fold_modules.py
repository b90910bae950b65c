"""Small modules for tests/training/test_fold.py's cases: the patterns a plain nn.Sequential cannot
express, convolutions with a forward of their own, and BN after a channel concat."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional

# --- small modules for the patterns that a plain nn.Sequential cannot express ------------------


class Residual(nn.Module):
    """conv -> BN, but the conv output is also added back: conv has two consumers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    """One conv called twice; torch.fx's fuser folds BN into it and corrupts the second call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


class SharedNextLinear(nn.Module):
    """BN -> fc, with fc also applied to the raw input."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x)) + self.fc(x)


class TiedLinears(nn.Module):
    """Two Linear modules holding the same weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(5, 5), nn.Linear(5, 5), nn.BatchNorm1d(5)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.b(x)


class SharedBN(nn.Module):
    """One BN applied after two different Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(5, 4), nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) * self.bn(self.b(x))


class TwoInputs(nn.Module):
    """Positional inputs as a tuple: an image branch and a vector branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc, self.bn1 = nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(img)).mean(dim=(2, 3)) + self.bn1(self.fc(vec))


class Branchy(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it) around traceable Sequentials."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.neg = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > -100:  # always taken on test inputs: `neg` never runs
            return self.bn(self.pos(x))
        return self.neg(x)


# --- convolutions with a forward of their own (TensorFlow ports, re-parametrized weights) ------


class StaticSamePadConv(nn.Conv2d):
    """As efficientnet_pytorch's Conv2dStaticSamePadding: a ZeroPad2d child, then conv2d."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, size: int = 6, **kw: Any):
        super().__init__(cin, cout, k, stride, **kw)
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        self.static_padding = nn.ZeroPad2d((total // 2, total - total // 2) * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return functional.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class DynamicSamePadConv(nn.Conv2d):
    """As geffnet's Conv2dSame: TensorFlow "SAME" padding computed from each input's size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for i, k, s, d in zip(
            x.size()[-2:], self.weight.size()[-2:], self.stride, self.dilation, strict=True
        ):
            total = max((-(i // -s) - 1) * s + (k - 1) * d + 1 - i, 0)
            pads = [total // 2, total - total // 2, *pads]  # F.pad lists the last axis first
        x = functional.pad(x, pads)
        return functional.conv2d(
            x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )


class AtenConv(nn.Conv2d):
    """Calls the ATen operator rather than ``F.conv2d``: the same op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class OwnForwardLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, self.weight, self.bias)


class StdConv(nn.Conv2d):
    """Weight standardization as timm's StdConv2d: a fold would be standardized away."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(1, self.out_channels, -1)
        w = functional.batch_norm(flat, None, None, training=True, momentum=0.0, eps=1e-6)
        return functional.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


class ScaledWeightConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.conv2d(x, self.weight * 0.5, self.bias, self.stride, self.padding)


class ScaledBiasLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, self.weight, self.bias * 2)


class NoneBiasConv(nn.Conv2d):
    """``bias=False``, and forward passes ``None``, not ``self.bias``: a fold's bias is lost."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.conv2d(x, self.weight, None, self.stride, self.padding)


class AliasedWeightConv(nn.Conv2d):
    """Convolves with an alias of its weight kept outside its parameters."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.alias = [self.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.conv2d(x, self.alias[0], self.bias, self.stride, self.padding)


class DelegatingConv(nn.Conv2d):
    """Holds conv weights, but its forward runs another module: it cannot be read as a conv."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.inner = nn.Conv2d(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class DoubledOutputConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).mul_(2)


def hooked_conv() -> nn.Conv2d:
    conv = nn.Conv2d(3, 4, 3)
    conv.register_forward_hook(lambda m, args, out: out.tanh())
    return conv


@torch.jit.script
def scripted_hard_swish(x: torch.Tensor) -> torch.Tensor:
    return x * functional.relu6(x + 3.0) / 6.0


class ScriptedActivation(nn.Module):
    """As geffnet's HardSwishJit: torch.fx cannot trace into a TorchScript function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scripted_hard_swish(x)


class ResidualBlock(nn.Module):
    """Not an nn.Sequential: folding here needs the block's graph, so its activation's too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = (
            nn.Conv2d(3, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            ScriptedActivation(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.bn(self.conv(x)))


# --- BN after a channel concat (mixed-kernel convs, DenseNet's feature reuse) ------------------


class MixedConv(nn.Module):
    """As geffnet's MixedConv2d: split the channels, one conv per group and kernel size, concat.

    ``zipped``: loop over the pieces of the split as pytorchcv's MixConv does.
    """

    def __init__(self, depthwise: bool, zipped: bool = False) -> None:
        super().__init__()
        self.zipped = zipped
        self.splits, outs = [3, 3], [3, 3] if depthwise else [4, 3]
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(3, outs[0], 3, padding=1, groups=3 if depthwise else 1, bias=False),
                DynamicSamePadConv(3, outs[1], 4, groups=3 if depthwise else 1, bias=False),
            ]
        )
        self.bn = nn.BatchNorm2d(sum(outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, 1)
        if self.zipped:
            return self.bn(
                torch.cat(tuple(c(p) for p, c in zip(parts, self.convs, strict=True)), 1)
            )
        return self.bn(torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], 1))


class TwoBranches(nn.Module):
    """``bn(cat([a(x), b(x)], dim))``, with optional extra uses of the pieces."""

    def __init__(
        self,
        a: nn.Module,
        b: nn.Module,
        bn: nn.Module,
        dim: int = 1,
        reuse: str = "",  # "a": a's output also feeds the result; "cat": so does the concat's
    ) -> None:
        super().__init__()
        self.a, self.b, self.bn, self.dim, self.reuse = a, b, bn, dim, reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        cat = torch.cat([a, self.b(x)], self.dim)
        out = self.bn(cat)
        if self.reuse == "a":
            return out + a.mean()
        if self.reuse == "cat":
            return out + cat
        return out


class DenseFeatures(nn.Module):
    """DenseNet's layer: the block input is concatenated with new features, then normalized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([x, self.conv(x)], 1))


class FoldedThenConcat(nn.Module):
    """conv1 -> bn1 -> cat with conv2 -> bn2: bn1 folds into conv1, then bn2 into both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.conv2, self.bn2 = StaticSamePadConv(3, 3, 3), nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(torch.cat([self.bn1(self.conv1(x)), self.conv2(x)], 1))
