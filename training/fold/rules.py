"""Whether folding one BatchNorm into neighbouring layers is exact, and the weight edits if so.

Facts come from one eval run of the model on the example inputs
(:func:`~training.fold.probe.probe_model`: call counts, input shapes, names,
parameter owners, whether each layer's forward is torch's op on its own weights)
and from the caller, who finds each BN's neighbours (a ``torch.fx`` graph, or
the children of an ``nn.Sequential``): one layer on each side, or a channel
:class:`Concat` of several layers before it. :class:`BatchNormFolder` refuses a
fold that could change any output, with a reason for the :class:`FoldReport`,
and stages every accepted fold in float64 until :meth:`BatchNormFolder.write_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from foldserve.model_format import FoldedBatchNorm, KeptBatchNorm
from training.batchnorm import batch_norm_affine
from training.fold.layer_forward import WEIGHT_LAYERS, has_own_forward
from training.fold.probe import Probe
from training.fold.report import Direction, FoldReport
from training.fold.weights import (
    conv_padding_is_zero,
    fold_bn_into_next_conv,
    fold_bn_into_next_linear,
    fold_conv_bn_weights,
    fold_linear_bn_weights,
    round_to_dtype,
)

_Layer = nn.Linear | _ConvNd
_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def layer_kind(m: nn.Module) -> str:
    """The layer's kind as the report words it: linear, conv or transposed conv."""
    if isinstance(m, nn.Linear):
        return "linear"
    return "transposed conv" if isinstance(m, _ConvTransposeNd) else "conv"


def qualified_name(prefix: str, name: str) -> str:
    """``name`` of a child as ``named_modules`` spells it from the root (``prefix``: its parent)."""
    return f"{prefix}.{name}" if prefix else name


@dataclass
class Neighbour:
    """The node on one side of a BN: a Linear/Conv/ConvTranspose (``module``) or a description.

    Whether folding into ``module`` is exact is the folder's call, not the caller's.
    """

    name: str
    module: nn.Module | None
    description: str
    refusal: str | None = None  # found from the graph: other consumers, weights read elsewhere
    graph_calls: int = 0


@dataclass
class Concat:
    """A concatenation along the channel axis feeding a BN: channel slice ``i`` is input ``i``.

    Each input is a candidate producer to fold its slice of the BN into.
    """

    description: str
    dim: int  # as written; the folder checks it is the channel axis of the BN's input
    producers: list[Neighbour] = field(default_factory=list)
    refusal: str | None = None  # found from the graph: the concat's other consumers, ...


@dataclass
class _Edit:
    """A layer's weights in float64 while folds accumulate; written back once at the end."""

    layer: _Layer
    weight: torch.Tensor
    bias: torch.Tensor | None


def _channels(layer: nn.Module, role: str) -> int:
    """Output channels of a preceding layer, input channels of a following one."""
    if isinstance(layer, nn.Linear):
        return layer.out_features if role != "following" else layer.in_features
    assert isinstance(layer, _ConvNd)
    return layer.out_channels if role != "following" else layer.in_channels


class BatchNormFolder:
    """One fold's decisions: refusals, the report and the staged weight edits.

    ``training_bns`` holds the ids of the BNs (in the model being folded) that
    were in training mode in the caller's model; they are never folded.
    """

    def __init__(self, probe: Probe, training_bns: set[int]) -> None:
        self.probe, self.training_bns = probe, training_bns
        self.report = FoldReport()
        self.edits: dict[int, _Edit] = {}

    # --- decisions ---------------------------------------------------------------------------

    def _bn_refusal(self, bn: _BatchNorm) -> str | None:
        if id(bn) in self.training_bns:
            return "BN is in training mode (uses batch statistics); call model.eval() first"
        if type(bn).forward not in _BN_FORWARDS:
            return f"BatchNorm subclass {type(bn).__name__} overrides forward"
        if bn.running_mean is None or bn.running_var is None:
            return "track_running_stats=False: BN normalizes with batch statistics even in eval"
        calls = self.probe.calls[id(bn)]
        if calls == 0:
            return "BN did not run on example_inputs, so its input shape is unknown"
        if calls > 1 or len(self.probe.names[id(bn)]) > 1:
            return f"BN module is shared (called {calls} times): folding would change other uses"
        return None

    def _layer_refusal(self, nb: Neighbour, role: str) -> str | None:
        layer = nb.module
        assert layer is not None
        what = f"{role} {layer_kind(layer)} '{nb.name}'"
        calls = max(self.probe.calls[id(layer)], nb.graph_calls)
        if calls > 1:
            return f"{what} is called {calls} times (shared weights): folding would corrupt others"
        if len(names := self.probe.names[id(layer)]) > 1:
            return f"{what} is registered under several names ({', '.join(names)})"
        if any(len(self.probe.param_owners[id(p)]) > 1 for p in layer.parameters(recurse=False)):
            return f"{what} shares its parameters with another module (folding would untie them)"
        if nb.refusal is not None:
            return nb.refusal
        if id(layer) not in self.probe.layer_refusals:
            return f"{what} did not run on example_inputs, so its forward could not be read"
        if (why := self.probe.layer_refusals[id(layer)]) is not None:
            return f"{what} ({type(layer).__name__}): {why}"
        return None

    def _shape_refusal(self, bn: _BatchNorm, nb: Neighbour, role: str) -> str | None:
        """Whether the BN's per-channel axis (dim 1) is the layer's channel axis."""
        layer, shape = nb.module, self.probe.in_shapes[id(bn)]
        assert isinstance(layer, WEIGHT_LAYERS)
        what = f"{role} {layer_kind(layer)} '{nb.name}'"
        if isinstance(layer, nn.Linear) and len(shape) != 2:
            return (
                f"BN input is {len(shape)}-D {shape}: {what} folds only on 2-D (N, C) "
                "activations (BN normalizes dim 1, a Linear maps the last dim)"
            )
        if isinstance(layer, _ConvNd) and len(shape) != len(layer.kernel_size) + 2:
            return f"BN input {shape} is not the batched (N, C, ...) layout of {what}"
        if role != "concatenated" and bn.num_features != (channels := _channels(layer, role)):
            return f"BN has {bn.num_features} channels but {what} has {channels}"
        return None

    def _concat_refusal(self, bn: _BatchNorm, cat: Concat) -> str | None:
        if cat.refusal is not None:
            return f"preceding {cat.description}: {cat.refusal}"
        rank = len(self.probe.in_shapes[id(bn)])
        if not -rank <= cat.dim < rank or cat.dim % rank != 1:
            return f"preceding {cat.description} is not along the channel axis (dim 1) of the BN"
        for i, nb in enumerate(cat.producers):
            if nb.module is None:
                return f"preceding {cat.description}: input {i} is {nb.description}, not a layer"
            role = "concatenated"
            if why := self._layer_refusal(nb, role) or self._shape_refusal(bn, nb, role):
                return f"preceding {cat.description}: {why}"
        channels = sum(_channels(nb.module, "preceding") for nb in cat.producers if nb.module)
        if channels != bn.num_features:
            return f"BN has {bn.num_features} channels but {cat.description} gives {channels}"
        return None

    def _backward_refusal(self, bn: _BatchNorm, nb: Neighbour | Concat) -> str | None:
        if isinstance(nb, Concat):
            return self._concat_refusal(bn, nb)
        if nb.module is None:
            return f"no layer to fold into before it ({nb.description})"
        return self._layer_refusal(nb, "preceding") or self._shape_refusal(bn, nb, "preceding")

    def _forward_refusal(self, bn: _BatchNorm, nb: Neighbour) -> str | None:
        layer = nb.module
        if layer is None:
            return f"no layer to fold into after it ({nb.description})"
        if isinstance(layer, _ConvTransposeNd):
            return f"following transposed conv '{nb.name}': forward folding needs a Linear or Conv"
        if has_own_forward(layer):
            return (
                f"following {layer_kind(layer)} '{nb.name}' ({type(layer).__name__}) has a forward "
                "of its own (it may pad its input): forward folding needs torch's own layer"
            )
        if isinstance(layer, _ConvNd) and not conv_padding_is_zero(
            layer.padding, layer.kernel_size, layer.dilation
        ):
            return (
                f"following conv '{nb.name}' has padding {layer.padding}: forward folding "
                "needs padding 0 (padded borders would miss the BN shift)"
            )
        return self._layer_refusal(nb, "following") or self._shape_refusal(bn, nb, "following")

    def decide(
        self, bn: _BatchNorm, name: str, before: Neighbour | Concat, after: Neighbour
    ) -> bool:
        """Fold ``bn`` into its neighbours if that is exact, else record why not; True if folded."""
        reason = self._bn_refusal(bn)
        if reason is None:
            if (back := self._backward_refusal(bn, before)) is None:
                producers = before.producers if isinstance(before, Concat) else [before]
                self._fold(bn, name, producers, "backward")
                return True
            if (fwd := self._forward_refusal(bn, after)) is None:
                self._fold(bn, name, [after], "forward")
                return True
            reason = f"{back}; {fwd}"
        self.report.kept.append(KeptBatchNorm(bn=name, reason=reason))
        return False

    # --- weight edits ------------------------------------------------------------------------

    def _edit(self, layer: nn.Module | None) -> _Edit:
        assert isinstance(layer, nn.Linear | _ConvNd)
        edit = self.edits.get(id(layer))
        if edit is None:
            bias = None if layer.bias is None else layer.bias.detach().to(torch.float64)
            edit = _Edit(layer, layer.weight.detach().to(torch.float64), bias)
            self.edits[id(layer)] = edit
        return edit

    def _fold(
        self, bn: _BatchNorm, name: str, layers: list[Neighbour], direction: Direction
    ) -> None:
        """Fold ``bn`` into one layer, or into each producer of its channel slices (in order)."""
        assert bn.running_mean is not None and bn.running_var is not None
        stats = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        scale, shift = batch_norm_affine(*stats)
        start = 0
        for nb in layers:
            edit = self._edit(nb.module)
            width = _channels(edit.layer, "preceding") if len(layers) > 1 else scale.shape[0]
            s, t = (v[start : start + width].to(edit.weight.device) for v in (scale, shift))
            edit.weight, edit.bias = self._folded(edit, s, t, direction)
            start += width
        into = ", ".join(nb.name for nb in layers)
        self.report.folded.append(FoldedBatchNorm(bn=name, into=into, direction=direction))

    @staticmethod
    def _folded(
        edit: _Edit, scale: torch.Tensor, shift: torch.Tensor, direction: Direction
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer, w, b = edit.layer, edit.weight, edit.bias
        if isinstance(layer, nn.Linear):
            fold = fold_linear_bn_weights if direction == "backward" else fold_bn_into_next_linear
            return fold(w, b, scale, shift)
        if direction == "backward":
            transpose = isinstance(layer, _ConvTransposeNd)
            return fold_conv_bn_weights(w, b, scale, shift, transpose, layer.groups)
        return fold_bn_into_next_conv(w, b, scale, shift, layer.groups)

    def write_weights(self, dtype: torch.dtype | None) -> None:
        """Cast each edited layer's float64 weights once: to ``dtype``, else to its own dtype."""
        for edit in self.edits.values():
            layer, grad = edit.layer, edit.layer.weight.requires_grad
            w_dtype = dtype or layer.weight.dtype
            b_dtype = dtype or (layer.weight if layer.bias is None else layer.bias).dtype
            assert edit.bias is not None  # every fold produces a bias
            weight, bias = round_to_dtype(edit.weight, w_dtype), round_to_dtype(edit.bias, b_dtype)
            layer.weight = nn.Parameter(weight, requires_grad=grad)
            layer.bias = nn.Parameter(bias, requires_grad=grad)
