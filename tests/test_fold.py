"""fold_batchnorm: exact outputs, the right BNs folded or kept (with reasons), caller untouched."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.nn import functional
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from training.batchnorm import randomize_batchnorm
from training.fold import FoldedBN, FoldError, FoldReport, KeptBN, fold_batchnorm
from training.fold.weights import round_to_dtype
from training.zoo import ModelConfig, build_model, count_batchnorms


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These layers are tiny: one intra-op thread is faster, and robust to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# --- the cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    build: Callable[[], nn.Module]
    inputs: tuple[tuple[int, ...], ...]  # per positional input, without the batch of 4
    folded: dict[str, tuple[str, str]]  # bn -> (into, direction)
    kept: dict[str, str] = field(default_factory=dict)  # bn -> substring of its reason
    train_bns: tuple[str, ...] = ()  # BNs left in training mode in the caller's model


def seq(*layers: nn.Module) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(*copy.deepcopy(layers))


def zoo(name: str, shape: tuple[int, ...], **kw: object) -> Callable[[], nn.Module]:
    return lambda: build_model(ModelConfig(name, shape, 3, width=4, **kw))  # type: ignore[arg-type]


def back(*units: str) -> dict[str, tuple[str, str]]:
    """Zoo units ``layer -> BN -> act``: BN ``u.1`` folds backward into ``u.0``."""
    return {f"{u}.1": (f"{u}.0", "backward") for u in units}


B, F = "backward", "forward"
P = nn.utils.parametrizations
IMG = ((3, 6, 6),)
SITE_CASES: dict[str, Case] = {
    # convolutions with a forward of their own: folded where it is torch's op on its own weights
    "static_same_pad_conv": Case(
        seq(StaticSamePadConv(3, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4), nn.SiLU()),
        IMG,
        {"1": ("0", B)},
    ),
    "dynamic_same_pad_depthwise_conv": Case(
        seq(DynamicSamePadConv(3, 3, 4, stride=2, groups=3), nn.BatchNorm2d(3)),
        IMG,
        {"1": ("0", B)},
    ),
    "aten_conv": Case(seq(AtenConv(3, 4, 3, bias=False), nn.BatchNorm2d(4)), IMG, {"1": ("0", B)}),
    "own_forward_linear": Case(
        seq(OwnForwardLinear(5, 4), nn.BatchNorm1d(4)), ((5,),), {"1": ("0", B)}
    ),
    "own_forward_conv_is_not_folded_forward_into": Case(
        seq(nn.BatchNorm2d(3), DynamicSamePadConv(3, 4, 3)),
        IMG,
        {},
        {"0": "following conv '1' (DynamicSamePadConv) has a forward of its own"},
    ),
    "block_with_scripted_activation": Case(ResidualBlock, IMG, {"bn": ("conv", B)}),
    # ... refused where the weight or bias is transformed, or the forward cannot be read
    "weight_standardized_conv": Case(
        seq(StdConv(3, 4, 3), nn.BatchNorm2d(4)),
        IMG,
        {},
        {"1": "preceding conv '0' (StdConv): its forward computes with its weight or bias"},
    ),
    "scaled_weight_conv": Case(
        seq(ScaledWeightConv(3, 4, 3), nn.BatchNorm2d(4)),
        IMG,
        {},
        {"1": "its forward computes with its weight or bias (Tensor.mul)"},
    ),
    "scaled_bias_linear": Case(
        seq(ScaledBiasLinear(5, 4), nn.BatchNorm1d(4)),
        ((5,),),
        {},
        {"1": "computes with its weight or bias (Tensor.mul)"},
    ),
    "none_bias_conv": Case(
        seq(NoneBiasConv(3, 4, 3, bias=False), nn.BatchNorm2d(4)),
        IMG,
        {},
        {"1": "its forward passes conv2d a bias other than its own"},
    ),
    "aliased_weight_conv": Case(
        seq(AliasedWeightConv(3, 4, 3), nn.BatchNorm2d(4)),
        IMG,
        {},
        {"1": "its forward passes conv2d another tensor as weight"},
    ),
    "delegating_conv": Case(
        seq(DelegatingConv(3, 4, 3), nn.BatchNorm2d(4)),
        IMG,
        {},
        {"1": "its forward cannot be read: no conv2d call received its weight"},
    ),
    "changed_output_conv": Case(
        seq(DoubledOutputConv(3, 4, 3), nn.BatchNorm2d(4)),
        IMG,
        {},
        {"1": "its forward changes the conv2d output (Tensor.mul_)"},
    ),
    "weight_norm_conv": Case(
        seq(P.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)),
        IMG,
        {},
        {"1": "preceding conv '0' (ParametrizedConv2d): its weight is parametrized"},
    ),
    "spectral_norm_linear_forward": Case(
        seq(nn.BatchNorm1d(5), P.spectral_norm(nn.Linear(5, 3))),
        ((5,),),
        {},
        {"0": "following linear '1' (ParametrizedLinear): its weight is parametrized"},
    ),
    "hooked_conv": Case(
        lambda: nn.Sequential(hooked_conv(), nn.BatchNorm2d(4)),
        IMG,
        {},
        {"1": "it has forward hooks"},
    ),
    # BN after a channel concat: each slice folds into its producer
    "mixed_kernel_conv": Case(
        lambda: MixedConv(depthwise=False), ((6, 6, 6),), {"bn": ("convs.0, convs.1", B)}
    ),
    "mixed_kernel_depthwise_conv": Case(
        lambda: MixedConv(depthwise=True), ((6, 6, 6),), {"bn": ("convs.0, convs.1", B)}
    ),
    "mixed_kernel_conv_zipped_split": Case(
        lambda: MixedConv(depthwise=True, zipped=True),
        ((6, 6, 6),),
        {"bn": ("convs.0, convs.1", B)},
    ),
    "concat_of_linears_dim_minus_1": Case(
        lambda: TwoBranches(nn.Linear(5, 3), OwnForwardLinear(5, 4), nn.BatchNorm1d(7), dim=-1),
        ((5,),),
        {"bn": ("a, b", B)},
    ),
    "bn_folded_then_concat_folded": Case(
        FoldedThenConcat, IMG, {"bn1": ("conv1", B), "bn2": ("conv1, conv2", B)}
    ),
    # ... kept where a slice's producer is not a layer, or feeds something else
    "concat_input_used_elsewhere": Case(
        lambda: TwoBranches(nn.Conv2d(3, 2, 3), nn.Conv2d(3, 3, 3), nn.BatchNorm2d(5), reuse="a"),
        IMG,
        {},
        {"bn": "concatenated conv 'a' output has other consumers (mean)"},
    ),
    "concat_output_used_elsewhere": Case(
        lambda: TwoBranches(nn.Conv2d(3, 2, 3), nn.Conv2d(3, 3, 3), nn.BatchNorm2d(5), reuse="cat"),
        IMG,
        {},
        {"bn": "concat 'cat' (torch.cat, dim 1): its output has other consumers (add)"},
    ),
    "dense_features": Case(
        DenseFeatures, IMG, {}, {"bn": "input 0 is model input 'x', not a layer"}
    ),
    "concat_on_spatial_axis": Case(
        lambda: TwoBranches(nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), dim=2),
        IMG,
        {},
        {"bn": "is not along the channel axis (dim 1)"},
    ),
    "concat_with_standardized_conv": Case(
        lambda: TwoBranches(nn.Conv2d(3, 2, 3), StdConv(3, 3, 3), nn.BatchNorm2d(5)),
        IMG,
        {},
        {"bn": "concatenated conv 'b' (StdConv): its forward computes with its weight"},
    ),
}


CASES: dict[str, Case] = {
    "conv2d_bn": Case(
        seq(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), ((3, 6, 6),), {"1": ("0", B)}
    ),
    "conv1d_stride_dilation_nobias": Case(
        seq(nn.Conv1d(3, 5, 3, stride=2, dilation=2, bias=False), nn.BatchNorm1d(5)),
        ((3, 11),),
        {"1": ("0", B)},
    ),
    "conv3d_grouped": Case(
        seq(nn.Conv3d(4, 6, 2, groups=2, padding=1), nn.BatchNorm3d(6)),
        ((4, 3, 3, 3),),
        {"1": ("0", B)},
    ),
    "conv2d_depthwise_nobias": Case(
        seq(nn.Conv2d(4, 4, 3, groups=4, padding=1, bias=False), nn.BatchNorm2d(4)),
        ((4, 5, 5),),
        {"1": ("0", B)},
    ),
    "convtranspose1d": Case(
        seq(nn.ConvTranspose1d(3, 5, 3, stride=2), nn.BatchNorm1d(5)), ((3, 4),), {"1": ("0", B)}
    ),
    "convtranspose2d_grouped_nobias": Case(
        seq(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False), nn.BatchNorm2d(6)),
        ((4, 3, 3),),
        {"1": ("0", B)},
    ),
    "convtranspose3d_grouped_dilated": Case(
        seq(nn.ConvTranspose3d(6, 4, 2, groups=2, dilation=2), nn.BatchNorm3d(4)),
        ((6, 2, 2, 2),),
        {"1": ("0", B)},
    ),
    "convtranspose2d_depthwise": Case(
        seq(nn.ConvTranspose2d(4, 4, 3, groups=4), nn.BatchNorm2d(4)), ((4, 3, 3),), {"1": ("0", B)}
    ),
    "linear_bn": Case(seq(nn.Linear(5, 7), nn.BatchNorm1d(7)), ((5,),), {"1": ("0", B)}),
    "linear_bn_affine_false_momentum_none": Case(
        seq(nn.Linear(5, 7), nn.BatchNorm1d(7, eps=1e-2, momentum=None, affine=False)),
        ((5,),),
        {"1": ("0", B)},
    ),
    "bn_forward_into_linear": Case(
        seq(nn.BatchNorm1d(5), nn.Linear(5, 3)), ((5,),), {"0": ("1", F)}
    ),
    "bn_forward_into_grouped_conv_pad0": Case(
        seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=2, groups=2)),
        ((4, 7, 7),),
        {"0": ("1", F)},
    ),
    "bn_forward_into_conv1d_reflect_pad0": Case(
        seq(nn.ReLU(), nn.BatchNorm1d(4), nn.Conv1d(4, 4, 3, dilation=2, padding_mode="reflect")),
        ((4, 9),),
        {"1": ("2", F)},
    ),
    "bn_forward_into_depthwise_conv3d_valid": Case(
        seq(nn.BatchNorm3d(4), nn.Conv3d(4, 8, 2, groups=4, padding="valid", bias=False)),
        ((4, 3, 3, 3),),
        {"0": ("1", F)},
    ),
    "prefers_backward": Case(
        seq(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)), ((5,),), {"1": ("0", B)}
    ),
    "both_sides_into_one_linear": Case(
        seq(nn.BatchNorm1d(5), nn.Linear(5, 6), nn.BatchNorm1d(6, affine=False)),
        ((5,),),
        {"0": ("1", F), "2": ("1", B)},
    ),
    "two_bns_after_conv": Case(
        seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, eps=1e-3)),
        ((3, 5, 5),),
        {"1": ("0", B), "2": ("0", B)},
    ),
    "two_inputs": Case(TwoInputs, ((3, 5, 5), (6,)), {"bn2": ("conv", B), "bn1": ("fc", B)}),
    # refusals
    "conv_output_has_other_consumers": Case(
        Residual, ((3, 5, 5),), {}, {"bn": "preceding conv 'conv' output has other consumers"}
    ),
    "shared_conv": Case(
        SharedConv, ((3, 5, 5),), {}, {"bn": "preceding conv 'conv' is called 2 times"}
    ),
    "shared_following_linear": Case(
        SharedNextLinear, ((5,),), {}, {"bn": "following linear 'fc' is called 2 times"}
    ),
    "tied_weights": Case(TiedLinears, ((5,),), {}, {"bn": "shares its parameters"}),
    "shared_bn": Case(SharedBN, ((5,),), {}, {"bn": "BN module is shared (called 2 times)"}),
    "track_running_stats_false": Case(
        seq(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False)),
        ((5,),),
        {},
        {"1": "track_running_stats=False"},
    ),
    "bn_in_training_mode": Case(
        seq(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), nn.BatchNorm1d(3)),
        ((5,),),
        {"4": ("3", B)},
        {"1": "training mode"},
        train_bns=("1",),
    ),
    "bn_before_padded_conv": Case(
        seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)),
        ((3, 6, 6),),
        {},
        {"2": "following conv '3' has padding (1, 1)"},
    ),
    "bn_first_then_activation": Case(
        seq(nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)),
        ((4,),),
        {},
        {"0": "no layer to fold into before it (model input"},
    ),
    "linear_bn_on_3d": Case(
        seq(nn.Linear(8, 8), nn.BatchNorm1d(8)),
        ((8, 8),),
        {},
        {"1": "3-D (4, 8, 8): preceding linear '0' folds only on 2-D"},
    ),
    "bn_on_3d_then_linear": Case(
        seq(nn.BatchNorm1d(6), nn.Linear(5, 3)),
        ((6, 5),),
        {},
        {"0": "3-D (4, 6, 5): following linear '1' folds only on 2-D"},
    ),
    "bn_then_convtranspose": Case(
        seq(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 2)),
        ((4, 3, 3),),
        {},
        {"0": "following transposed conv '1'"},
    ),
    # zoo models
    "zoo_mlp_before": Case(zoo("mlp", (8,)), ((8,),), back("2", "3")),
    "zoo_mlp_after": Case(
        zoo("mlp", (8,), bn_position="after"), ((8,),), {"2.2": ("3.0", F), "3.2": ("4", F)}
    ),
    "zoo_mlp_sigmoid": Case(
        zoo("mlp", (8,), activation="sigmoid", depth=3), ((8,),), back("2", "3", "4")
    ),
    "zoo_cnn": Case(zoo("cnn", (3, 8, 8)), ((3, 8, 8),), back("1", "2", "4", "5")),
    "zoo_cnn_after": Case(
        zoo("cnn", (3, 8, 8), bn_position="after"),
        ((3, 8, 8),),
        {},
        {
            "1.2": "has padding",
            "2.2": "'3' (MaxPool2d)",
            "4.2": "has padding",
            "5.2": "'6' (MaxPool2d)",
        },
    ),
    "zoo_resnet": Case(
        zoo("resnet", (3, 8, 8)),
        ((3, 8, 8),),
        back(
            "1",
            "2.body.0",
            "2.body.1",
            "3.body.0",
            "3.body.1",
            "3.shortcut",
            "4.body.0",
            "4.body.1",
            "4.shortcut",
        ),
    ),
    "zoo_mobilenet": Case(
        zoo("mobilenet", (3, 8, 8)), ((3, 8, 8),), back("1", "2", "3", "4", "5", "6", "7")
    ),
    # torch.fx cannot trace these: fallback over submodules and nn.Sequential children
    "untraceable_module": Case(
        Branchy,
        ((3, 5, 5),),
        {"pos.1": ("pos.0", B)},
        {"bn": "which torch.fx cannot trace", "neg.1": "did not run on example_inputs"},
    ),
    "untraceable_sequential": Case(
        seq(
            nn.Conv2d(3, 3, 1),
            nn.BatchNorm2d(3),
            Branchy(),
            nn.Flatten(),
            nn.Linear(36, 5),
            nn.BatchNorm1d(5),
            nn.BatchNorm1d(5),
            nn.Linear(5, 2),
        ),
        ((3, 5, 5),),
        {"1": ("0", B), "2.pos.1": ("2.pos.0", B), "5": ("4", B), "6": ("7", F)},
        {"2.bn": "cannot trace", "2.neg.1": "did not run"},
    ),
    **SITE_CASES,
}


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(*inputs)
    return out


RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2}


def check_case(case: Case, dtype: torch.dtype) -> None:
    """Folding ``case`` in ``dtype`` gives its outputs to ``RTOL``, and the expected report."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = case.build().to(dtype).eval()
    randomize_batchnorm(model, gen)
    for name in case.train_bns:
        model.get_submodule(name).train()
    inputs = tuple(torch.randn(4, *s, generator=gen, dtype=dtype) for s in case.inputs)
    expected = _run(copy.deepcopy(model), inputs)  # a copy: a training-mode BN updates its stats

    folded, report = fold_batchnorm(model, inputs if len(inputs) > 1 else inputs[0])
    out = _run(folded, inputs)

    scale = max(1.0, expected.abs().max().item())
    assert (out - expected).abs().max().item() <= RTOL[dtype] * scale
    assert {f.bn: (f.into, f.direction) for f in report.folded} == case.folded
    assert {k.bn for k in report.kept} == set(case.kept)
    for k in report.kept:
        assert case.kept[k.bn] in k.reason, k.reason
    assert count_batchnorms(folded) == len(case.kept)
    assert all(p.dtype == dtype for p in folded.parameters())
    assert not folded.training
    in_training = {n for n, m in folded.named_modules() if isinstance(m, _BatchNorm) and m.training}
    assert in_training == set(case.train_bns)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fold_is_exact_and_reports_each_bn(case: Case, dtype: torch.dtype) -> None:
    check_case(case, dtype)


@pytest.mark.parametrize("case", SITE_CASES.values(), ids=SITE_CASES.keys())
def test_fold_sites_in_float16(case: Case) -> None:
    """Same-padding convs and concats fold (or are kept) alike in float16."""
    check_case(case, torch.float16)


def test_caller_model_is_untouched() -> None:
    model = build_model(ModelConfig("resnet", (3, 8, 8), 3, width=4))
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    model.eval()
    model[1][1].train()  # one BN in training mode, the rest eval
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    params = dict(model.named_parameters())

    folded, report = fold_batchnorm(model, torch.randn(4, 3, 8, 8))

    reason = "BN is in training mode (uses batch statistics); call model.eval() first"
    assert report.kept == [KeptBN("1.1", reason)] and len(report.folded) == 8
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert params == dict(model.named_parameters())
    assert count_batchnorms(model) == 9
    assert not any(p is q for p in folded.parameters() for q in model.parameters())


def test_fp16_folds_in_float64_and_rounds_once() -> None:
    """Each folded fp16 weight is the nearest to the exact one; on outputs that is a
    statistical gain, so output errors are summed over eight seeded models."""
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    worse = 0
    errors = {v: torch.zeros(2, dtype=torch.float64) for v in ("once", "naive")}
    for seed in range(8):
        torch.manual_seed(seed)
        model = build_model(ModelConfig("resnet", (3, 8, 8), 3, width=4)).eval()
        randomize_batchnorm(model, torch.Generator().manual_seed(2))

        once, _ = fold_batchnorm(model, x, dtype=torch.float16)
        naive, _ = fold_batchnorm(copy.deepcopy(model).half(), x.half())  # rounds, folds, rounds
        exact, _ = fold_batchnorm(copy.deepcopy(model).double(), x.double())

        assert all(p.dtype == torch.float16 for p in once.parameters())
        assert all(b.dtype == torch.float16 for b in once.buffers() if b.is_floating_point())
        w_exact, w_once, w_naive = (dict(m.named_parameters()) for m in (exact, once, naive))
        for name, w in w_exact.items():
            err_once = (w_once[name].double() - w).abs()
            err_naive = (w_naive[name].double() - w).abs()
            # round-to-nearest of the exact value: never further than any other fp16 value
            assert torch.all(err_once <= err_naive), name
            assert torch.all(err_once <= w.abs() * 2**-11 + 2**-25), name
            worse += int((err_naive > err_once).sum())

        reference = _run(model.double(), (x.double(),))
        scale = reference.abs().max().item()
        for name, folded in (("once", once), ("naive", naive)):
            fp16 = (_run(folded, (x.half(),)).double() - reference).abs()
            weights_only = (_run(folded.double(), (x.double(),)) - reference).abs()  # exact compute
            if name == "once":
                assert fp16.max().item() <= 1e-2 * scale  # within fp16 tolerance end to end
            errors[name] += torch.tensor([fp16.mean(), weights_only.mean()]) / scale
    assert worse > 0  # double rounding really does cost something on these models
    assert torch.all(errors["once"] < errors["naive"]), errors  # fp16 compute, exact compute


def test_float64_to_float16_rounds_once_where_torch_rounds_twice() -> None:
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x = torch.cat([x, torch.tensor([-0.020957945967999176, 7e4, -1e-9], dtype=torch.float64)])
    with np.errstate(over="ignore"):  # 7e4 overflows to inf, as it should
        nearest = torch.from_numpy(x.numpy().astype(np.float16))  # numpy rounds once

    assert torch.equal(round_to_dtype(x, torch.float16), nearest)
    assert not torch.equal(x.to(torch.float16), nearest)  # torch's cast goes through float32
    assert torch.equal(round_to_dtype(x, torch.float32), x.to(torch.float32))


def test_torch_fx_fuser_corrupts_a_shared_conv_but_fold_batchnorm_stays_exact() -> None:
    model = SharedConv().eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(4))
    x = torch.randn(2, 3, 6, 6)
    expected = _run(model, (x,))

    folded, report = fold_batchnorm(model, x)

    assert torch.allclose(_run(folded, (x,)), expected, atol=1e-6)
    assert [k.bn for k in report.kept] == ["bn"] and count_batchnorms(folded) == 1
    fused_error = (_run(fx_fuse(copy.deepcopy(model)), (x,)) - expected).abs().max().item()
    assert fused_error > 1e-2  # torch's fuser folds BN into the conv for both calls


def _torch_util_result(fuse: Callable[[], nn.Module], x: torch.Tensor) -> torch.Tensor | None:
    """torch's fused module's output, or None where torch's util raises on this input."""
    try:
        return _run(fuse(), (x,))
    except (RuntimeError, TypeError):
        return None


def test_grouped_convtranspose_fold_is_exact_where_torch_fusion_fails() -> None:
    conv, bn = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2).eval(), nn.BatchNorm2d(6).eval()
    randomize_batchnorm(bn, torch.Generator().manual_seed(5))
    x = torch.randn(2, 4, 5, 5)
    expected = _run(nn.Sequential(conv, bn), (x,))

    folded, report = fold_batchnorm(nn.Sequential(conv, bn), x)

    assert report.folded == [FoldedBN("1", "0", "backward")]
    assert torch.allclose(_run(folded, (x,)), expected, atol=1e-5)
    torch_out = _torch_util_result(lambda: fuse_conv_bn_eval(conv, bn, transpose=True), x)
    assert torch_out is None or not torch.allclose(torch_out, expected, atol=1e-5)


def test_linear_bn_affine_false_fold_is_exact_where_torch_fusion_fails() -> None:
    linear, bn = nn.Linear(5, 7).eval(), nn.BatchNorm1d(7, affine=False).eval()
    randomize_batchnorm(bn, torch.Generator().manual_seed(6))
    x = torch.randn(3, 5)
    expected = _run(nn.Sequential(linear, bn), (x,))

    folded, _ = fold_batchnorm(nn.Sequential(linear, bn), x)

    assert torch.allclose(_run(folded, (x,)), expected, atol=1e-5)
    torch_out = _torch_util_result(lambda: fuse_linear_bn_eval(linear, bn), x)
    assert torch_out is None or not torch.allclose(torch_out, expected, atol=1e-5)


def test_failing_example_inputs_raise_fold_error_naming_the_module() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(5, 2))
    with pytest.raises(FoldError, match="in module '2'"):
        fold_batchnorm(model, torch.randn(2, 4))


def test_report_renders_as_dict_text_and_rich_table() -> None:
    report = FoldReport(
        folded=[FoldedBN("1.1", "1.0", "backward")],
        kept=[KeptBN("3", "preceding conv '2' output has other consumers (add)")],
    )
    assert report.to_dict() == {
        "folded": [{"bn": "1.1", "into": "1.0", "direction": "backward"}],
        "kept": [{"bn": "3", "reason": "preceding conv '2' output has other consumers (add)"}],
    }
    lines = str(report).splitlines()
    assert lines[1].split() == ["1.1", "folded", "backward", "into", "'1.0'"]
    assert lines[2].startswith("3    kept    preceding conv '2'")
    console = Console(file=io.StringIO(), record=True, width=200)
    console.print(report.table())
    rendered = console.export_text()
    assert "1 folded, 1 kept" in rendered and "other consumers (add)" in rendered
