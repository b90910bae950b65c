"""The cases of tests/training/test_fold.py: for each model, which BN folds into what, or
is kept and why (the modules are in fold_modules.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from tests.training.fold_modules import (
    AliasedWeightConv,
    AtenConv,
    Branchy,
    DelegatingConv,
    DenseFeatures,
    DoubledOutputConv,
    DynamicSamePadConv,
    FoldedThenConcat,
    MixedConv,
    NoneBiasConv,
    OwnForwardLinear,
    Residual,
    ResidualBlock,
    ScaledBiasLinear,
    ScaledWeightConv,
    SharedBN,
    SharedConv,
    SharedNextLinear,
    StaticSamePadConv,
    StdConv,
    TiedLinears,
    TwoBranches,
    TwoInputs,
    hooked_conv,
)
from training.zoo import NetworkConfig, build_model

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
    return lambda: build_model(NetworkConfig(name, shape, 3, width=4, **kw))  # type: ignore[arg-type]


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
