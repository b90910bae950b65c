"""Whether a Conv/Linear layer computes torch's own op on its own ``weight`` and ``bias``.

Folding replaces a layer's ``weight`` and ``bias`` Parameters. That is exact only
when its forward hands exactly those Parameters, unmodified, to the one
convolution (or linear) call whose output it returns. Subclasses that pad their
input first (TensorFlow "same" padding, as in ``Conv2dStaticSamePadding`` or
``Conv2dSame``) do; a standardized or scaled weight (``StdConv2d``), a
parametrization (``weight_norm``, ``spectral_norm``) or a hook does not, and a
fold there would be undone or would corrupt the output.

The forward is read from its first call in the probe run (:class:`ForwardReader`):
stand-in Parameters (same values, new identities) replace ``weight`` and ``bias``
(a zero bias where there is none) for that call, a ``TorchFunctionMode`` records
every torch call the forward makes, and :func:`forward_refusal` checks that the
stand-ins reach the expected op by identity, that nothing else computes with
them, and that the op's output is returned untouched. Identity, not equal values,
is what proves a Parameter arrives unmodified and is read afresh on every call
(a forward reading a cached alias of the weight would miss a fold). What is
proved is the path taken in eval mode on the example inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

_OPS: dict[type[nn.Module], Callable[..., torch.Tensor]] = {
    nn.Linear: F.linear,
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
    nn.ConvTranspose1d: F.conv_transpose1d,
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}
WEIGHT_LAYERS = tuple(_OPS)
"""The layers folding can edit: Linear, Conv and ConvTranspose (1-3d), and their subclasses."""

# Reading these tells shapes and types, never values: a forward may read them freely.
_METADATA = frozenset(
    {"size", "dim", "numel", "nelement", "stride", "is_contiguous", "is_floating_point"}
    | {"element_size", "get_device", "shape", "dtype", "device", "ndim", "layout", "is_cuda"}
    | {"requires_grad", "is_leaf", "names", "is_sparse", "is_quantized", "is_meta"}
)
_GROUPS_ARG = 6  # (input, weight, bias, stride, padding, dilation | output_padding, groups, ...)


def base_layer(layer: nn.Module) -> type[nn.Module] | None:
    """The torch layer class that ``layer`` is (or subclasses), or None if it is none of them."""
    return next((t for t in WEIGHT_LAYERS if isinstance(layer, t)), None)


def has_own_forward(layer: nn.Module) -> bool:
    """Whether the layer's class replaces torch's ``forward`` (or the conv's ``_conv_forward``)."""
    base = base_layer(layer)
    return base is not None and any(
        getattr(type(layer), f, None) is not getattr(base, f, None)
        for f in ("forward", "_conv_forward")
    )


def _op_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":  # a Tensor property: name the property
        return f"Tensor.{getattr(getattr(func, '__self__', None), '__name__', '?')}"
    owner = getattr(func, "__objclass__", None)
    return f"Tensor.{name}" if owner is not None else name


def _reads_values(func: Callable[..., Any]) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name not in _METADATA


def _is_op(func: Callable[..., Any], op: Callable[..., Any]) -> bool:
    """``func`` is ``op`` (``F.conv2d``, ...) or its ATen operator (``torch.ops.aten.conv2d``)."""
    packet = getattr(torch.ops.aten, op.__name__)
    return func is op or func is packet or getattr(func, "overloadpacket", None) is packet


def static_refusal(layer: nn.Module) -> str | None:
    """Why folding into ``layer`` cannot be exact, seen without running it; None if no reason."""
    if parametrize.is_parametrized(layer):
        names = ", ".join(getattr(layer, "parametrizations", {}))
        return (
            f"its {names} is parametrized (torch.nn.utils.parametrize: weight_norm, "
            "spectral_norm, ...): the forward recomputes it, which would undo a fold"
        )
    params = layer._parameters
    if not isinstance(params.get("weight"), nn.Parameter):
        return (
            "its weight is not a registered Parameter (a hook computes it, as the old "
            "torch.nn.utils.weight_norm does): a folded weight would be overwritten"
        )
    if (
        "bias" in params
        and params["bias"] is not None
        and not isinstance(params["bias"], nn.Parameter)
    ):
        return "its bias is not a registered Parameter"
    if layer._forward_pre_hooks or layer._forward_hooks:
        return "it has forward hooks, which may change its weight or its output"
    return None


def _leaves(obj: object) -> list[object]:
    if isinstance(obj, list | tuple):
        return [leaf for item in obj for leaf in _leaves(item)]
    if isinstance(obj, dict):
        return _leaves(list(obj.values()))
    return [obj]


@dataclass(frozen=True, eq=False)  # compared by identity: tensor fields have no bool ==
class _Call:
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any

    def uses(self, tensor: object) -> bool:
        return any(leaf is tensor for leaf in _leaves((self.args, self.kwargs)))

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        return self.args[index] if len(self.args) > index else self.kwargs.get(name, default)


class _Recorder(TorchFunctionMode):
    """Records every torch call that reads tensor values, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[_Call] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _reads_values(func):
            self.calls.append(_Call(func, args, kwargs, out))
        return out


def forward_refusal(
    layer: nn.Module, calls: list[_Call], weight: torch.Tensor, bias: torch.Tensor, result: object
) -> str | None:
    """Why the recorded forward of ``layer`` is not its torch op on ``weight`` and ``bias``.

    ``calls`` are the value-reading torch calls of one forward, ``weight`` and
    ``bias`` the stand-ins it was given, ``result`` what it returned.
    """
    base = base_layer(layer)
    assert base is not None
    op = _OPS[base]
    name = op.__name__
    reads = [c for c in calls if c.uses(weight) or c.uses(bias)]
    if not reads:
        return f"its forward cannot be read: no {name} call received its weight"
    call = reads[0]
    if all(_is_op(c.func, op) for c in reads) and len(reads) > 1:
        return f"its forward passes its weight or bias to {name} {len(reads)} times"
    if not _is_op(call.func, op) or len(reads) > 1:
        other = next(c for c in reads if not _is_op(c.func, op))
        return (
            f"its forward computes with its weight or bias ({_op_name(other.func)}) instead of "
            f"passing them unmodified to {name}: a transformed (standardized, scaled, "
            "re-parametrized) weight would undo or distort a fold"
        )
    if call.arg(1, "weight") is not weight:
        return f"its forward passes {name} another tensor as weight, not its own"
    if call.arg(2, "bias") is not bias:
        return f"its forward passes {name} a bias other than its own (transformed, or None)"
    if base is not nn.Linear and (groups := call.arg(_GROUPS_ARG, "groups", 1)) != getattr(
        layer, "groups", 1
    ):
        return f"its forward calls {name} with groups={groups}, not its own groups"
    if result is not call.out:
        return f"its forward does not return the {name} output as it is"
    after = calls[calls.index(call) + 1 :]
    if (later := next((c for c in after if c.uses(call.out)), None)) is not None:
        return f"its forward changes the {name} output ({_op_name(later.func)}) before returning it"
    return None


class ForwardReader:
    """Reads one call of a layer's forward: :meth:`start` in a pre-hook, :meth:`finish` after.

    Between the two the layer holds stand-in Parameters and a recorder is the
    innermost torch function mode; :meth:`finish` (or :meth:`abandon` when the
    forward raised) puts the layer's own Parameters back.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        params = layer._parameters
        self.own = {"weight": params["weight"], "bias": params.get("bias")}
        weight, bias = self.own["weight"], self.own["bias"]
        assert weight is not None
        if bias is None:  # a zero stand-in: the forward must still pass ``self.bias``
            out = int(getattr(layer, "out_channels", 0) or getattr(layer, "out_features", 0))
            bias = nn.Parameter(torch.zeros(out, dtype=weight.dtype, device=weight.device))
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.recorder = _Recorder()

    def start(self) -> None:
        self.layer._parameters["weight"], self.layer._parameters["bias"] = self.weight, self.bias
        self.recorder.__enter__()  # type: ignore[no-untyped-call]

    def abandon(self) -> None:
        self.recorder.__exit__(None, None, None)  # type: ignore[no-untyped-call]
        self.layer._parameters.update(self.own)

    def finish(self, result: object) -> str | None:
        """Restore the layer; return why its forward cannot be folded into, or None."""
        self.abandon()
        return forward_refusal(self.layer, self.recorder.calls, self.weight, self.bias, result)
