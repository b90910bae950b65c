"""Fold eval-mode BatchNorm into the Conv, ConvTranspose or Linear layer beside it.

:func:`fold_batchnorm` rewrites the ``torch.fx`` graph of a deep copy. A BN folds
*backward* into the layer feeding it (preferred) or *forward* into the Linear or
zero-padding Conv it feeds; otherwise it is kept, with the reason, in the
:class:`FoldReport`. Shapes and call counts come from one run on ``example_inputs``
(forward hooks), so untraceable models work too: their traceable submodules are
folded by graph rewrite, and within an untraceable ``nn.Sequential`` consecutive
children ``layer -> BN`` / ``BN -> layer`` fold (the BN child becoming ``nn.Identity``).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from rich.table import Table
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from training.batchnorm import batch_norm_affine
from training.fold.weights import (
    conv_padding_is_zero,
    fold_bn_into_next_conv,
    fold_bn_into_next_linear,
    fold_conv_bn_weights,
    fold_linear_bn_weights,
)

log = logging.getLogger(__name__)

Direction = Literal["backward", "forward"]
_Layer = nn.Linear | _ConvNd
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYER_TYPES = (nn.Linear, *_CONVS, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


class FoldError(ValueError):
    """The model could not be run on ``example_inputs``; the message names the failing module."""


@dataclass(frozen=True)
class FoldedBN:
    """BN ``bn`` was folded into layer ``into`` (backward: layer -> BN; forward: BN -> layer)."""

    bn: str
    into: str
    direction: Direction


@dataclass(frozen=True)
class KeptBN:
    """BN ``bn`` is still in the folded model, for ``reason``."""

    bn: str
    reason: str


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did with every BatchNorm module, in ``named_modules`` order."""

    folded: list[FoldedBN] = field(default_factory=list)
    kept: list[KeptBN] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[dict[str, str]]]:
        """JSON-ready: ``{"folded": [{bn, into, direction}], "kept": [{bn, reason}]}``."""
        return {"folded": [asdict(f) for f in self.folded], "kept": [asdict(k) for k in self.kept]}

    def _rows(self) -> list[tuple[str, str, str]]:
        return [(f.bn, "folded", f"{f.direction} into '{f.into}'") for f in self.folded] + [
            (k.bn, "kept", k.reason) for k in self.kept
        ]

    def table(self) -> Table:
        """A rich table (BN, result, detail) for a console."""
        table = Table(title=f"BatchNorm folding: {len(self.folded)} folded, {len(self.kept)} kept")
        for column in ("BN", "result", "into / reason"):
            table.add_column(column)
        for row in self._rows():
            table.add_row(*row)
        return table

    def __str__(self) -> str:
        rows = [("BN", "result", "into / reason"), *self._rows()]
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows)


@dataclass
class _Probe:
    """What one eval run of the copy on the example inputs saw, keyed by ``id(module)``."""

    names: dict[int, list[str]]  # every qualified name the module is registered under
    calls: Counter[int]
    in_shapes: dict[int, tuple[int, ...]]  # shape of the first call's first tensor argument
    param_owners: dict[int, set[int]]  # id(parameter) -> ids of the modules holding it


def _probe(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> _Probe:
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name or "<model>")
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(module))
    calls: Counter[int] = Counter()
    shapes: dict[int, tuple[int, ...]] = {}
    stack: list[int] = []

    def before(module: nn.Module, args: tuple[object, ...]) -> None:
        calls[id(module)] += 1
        stack.append(id(module))
        if args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(id(module), tuple(args[0].shape))

    def after(module: nn.Module, args: tuple[object, ...], out: object) -> None:
        stack.pop()

    handles = [m.register_forward_pre_hook(before) for m in model.modules()]
    handles += [m.register_forward_hook(after) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # re-raised with the name of the module that failed
        where = names[stack[-1]][0] if stack else "<model>"
        raise FoldError(
            f"the model failed on example_inputs in module '{where}': {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return _Probe(names, calls, shapes, owners)


class _Tracer(fx.Tracer):
    """Keeps every BN and foldable layer (even user subclasses) a ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm | _ConvNd | nn.Linear) or super().is_leaf_module(
            m, module_qualified_name
        )


def _is_layer(m: nn.Module) -> bool:
    """A Linear/Conv/ConvTranspose whose computation is torch's own (subclasses may override it)."""
    base = next((t for t in _LAYER_TYPES if isinstance(m, t)), None)
    return base is not None and all(
        getattr(type(m), f, None) is getattr(base, f, None) for f in ("forward", "_conv_forward")
    )


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    return "transposed conv" if isinstance(m, _ConvTransposeNd) else "conv"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass
class _Neighbour:
    """The node on one side of a BN: a foldable layer (``module``) or a description of it."""

    name: str
    module: nn.Module | None
    description: str
    refusal: str | None = None  # found from the graph: other consumers, weights read elsewhere
    graph_calls: int = 0


@dataclass
class _Edit:
    """A layer's weights in float64 while folds accumulate; written back once at the end."""

    layer: _Layer
    weight: torch.Tensor
    bias: torch.Tensor | None


class _Folder:
    def __init__(self, probe: _Probe, training_bns: set[int]) -> None:
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

    def _layer_refusal(self, nb: _Neighbour, role: str) -> str | None:
        layer = nb.module
        assert layer is not None
        what = f"{role} {_kind(layer)} '{nb.name}'"
        calls = max(self.probe.calls[id(layer)], nb.graph_calls)
        if calls > 1:
            return f"{what} is called {calls} times (shared weights): folding would corrupt others"
        if len(names := self.probe.names[id(layer)]) > 1:
            return f"{what} is registered under several names ({', '.join(names)})"
        if any(len(self.probe.param_owners[id(p)]) > 1 for p in layer.parameters(recurse=False)):
            return f"{what} shares its parameters with another module (folding would untie them)"
        return nb.refusal

    def _shape_refusal(self, bn: _BatchNorm, nb: _Neighbour, role: str) -> str | None:
        """Whether the BN's per-channel axis (dim 1) is the layer's channel axis."""
        layer, shape = nb.module, self.probe.in_shapes[id(bn)]
        assert isinstance(layer, _LAYER_TYPES)
        what = f"{role} {_kind(layer)} '{nb.name}'"
        if isinstance(layer, nn.Linear) and len(shape) != 2:
            return (
                f"BN input is {len(shape)}-D {shape}: {what} folds only on 2-D (N, C) "
                "activations (BN normalizes dim 1, a Linear maps the last dim)"
            )
        if isinstance(layer, _ConvNd) and len(shape) != len(layer.kernel_size) + 2:
            return f"BN input {shape} is not the batched (N, C, ...) layout of {what}"
        if isinstance(layer, nn.Linear):
            channels = layer.out_features if role == "preceding" else layer.in_features
        else:
            channels = layer.out_channels if role == "preceding" else layer.in_channels
        if bn.num_features != channels:
            return f"BN has {bn.num_features} channels but {what} has {channels}"
        return None

    def _backward_refusal(self, bn: _BatchNorm, nb: _Neighbour) -> str | None:
        if nb.module is None:
            return f"no layer to fold into before it ({nb.description})"
        return self._layer_refusal(nb, "preceding") or self._shape_refusal(bn, nb, "preceding")

    def _forward_refusal(self, bn: _BatchNorm, nb: _Neighbour) -> str | None:
        layer = nb.module
        if layer is None:
            return f"no layer to fold into after it ({nb.description})"
        if isinstance(layer, _ConvTransposeNd):
            return f"following transposed conv '{nb.name}': forward folding needs a Linear or Conv"
        if isinstance(layer, _ConvNd) and not conv_padding_is_zero(
            layer.padding, layer.kernel_size, layer.dilation
        ):
            return (
                f"following conv '{nb.name}' has padding {layer.padding}: forward folding "
                "needs padding 0 (padded borders would miss the BN shift)"
            )
        return self._layer_refusal(nb, "following") or self._shape_refusal(bn, nb, "following")

    def decide(self, bn: _BatchNorm, name: str, before: _Neighbour, after: _Neighbour) -> bool:
        """Fold ``bn`` into a neighbour if that is exact, else record why not; True if folded."""
        reason = self._bn_refusal(bn)
        if reason is None:
            if (back := self._backward_refusal(bn, before)) is None:
                self._fold(bn, name, before, "backward")
                return True
            if (fwd := self._forward_refusal(bn, after)) is None:
                self._fold(bn, name, after, "forward")
                return True
            reason = f"{back}; {fwd}"
        self.report.kept.append(KeptBN(name, reason))
        return False

    # --- weight edits ------------------------------------------------------------------------

    def _fold(self, bn: _BatchNorm, name: str, nb: _Neighbour, direction: Direction) -> None:
        layer = nb.module
        assert isinstance(layer, _LAYER_TYPES) and bn.running_mean is not None
        assert bn.running_var is not None
        edit = self.edits.get(id(layer))
        if edit is None:
            bias = None if layer.bias is None else layer.bias.detach().to(torch.float64)
            edit = _Edit(layer, layer.weight.detach().to(torch.float64), bias)
            self.edits[id(layer)] = edit
        stats = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        scale, shift = (v.to(edit.weight.device) for v in batch_norm_affine(*stats))
        w, b = edit.weight, edit.bias
        if direction == "backward" and isinstance(layer, nn.Linear):
            edit.weight, edit.bias = fold_linear_bn_weights(w, b, scale, shift)
        elif direction == "backward":
            assert isinstance(layer, _ConvNd)
            transpose = isinstance(layer, _ConvTransposeNd)
            edit.weight, edit.bias = fold_conv_bn_weights(
                w, b, scale, shift, transpose, layer.groups
            )
        elif isinstance(layer, nn.Linear):
            edit.weight, edit.bias = fold_bn_into_next_linear(w, b, scale, shift)
        else:
            assert isinstance(layer, _ConvNd)
            edit.weight, edit.bias = fold_bn_into_next_conv(w, b, scale, shift, layer.groups)
        self.report.folded.append(FoldedBN(name, nb.name, direction))

    def write_weights(self, dtype: torch.dtype | None) -> None:
        """Cast each edited layer's float64 weights once: to ``dtype``, else to its own dtype."""
        for edit in self.edits.values():
            layer, grad = edit.layer, edit.layer.weight.requires_grad
            w_dtype = dtype or layer.weight.dtype
            b_dtype = dtype or (layer.weight if layer.bias is None else layer.bias).dtype
            assert edit.bias is not None  # every fold produces a bias
            layer.weight = nn.Parameter(edit.weight.to(w_dtype), requires_grad=grad)
            layer.bias = nn.Parameter(edit.bias.to(b_dtype), requires_grad=grad)

    # --- traversal ---------------------------------------------------------------------------

    def fold_module(self, module: nn.Module, prefix: str) -> nn.Module:
        """Fold inside ``module`` (qualified name ``prefix``); returns what replaces it."""
        try:
            graph = _Tracer().trace(module)
        except Exception as exc:  # any trace failure: fold the parts that can be traced
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.info("torch.fx cannot trace %r (%s); folding its children", prefix, why)
            self._fold_untraced(module, prefix, why)
            return module
        return self._fold_graph(fx.GraphModule(module, graph), prefix)

    def _fold_graph(self, gm: fx.GraphModule, prefix: str) -> fx.GraphModule:
        modules = dict(gm.named_modules())
        nodes = list(gm.graph.nodes)
        graph_calls = Counter(str(n.target) for n in nodes if n.op == "call_module")
        read_directly = {str(n.target).rpartition(".")[0] for n in nodes if n.op == "get_attr"}

        def describe(node: fx.Node) -> str:
            if node.op == "placeholder":
                return f"model input '{node.name}'"
            if node.op == "call_module":
                kind = type(modules[str(node.target)]).__name__
                return f"'{_join(prefix, str(node.target))}' ({kind})"
            return f"{node.op} {getattr(node.target, '__name__', node.target)}"

        def neighbour(node: fx.Node, role: str, consumers: list[str]) -> _Neighbour:
            target = str(node.target)
            module = modules.get(target) if node.op == "call_module" else None
            name = _join(prefix, target)
            if module is None or not _is_layer(module):  # not a foldable layer
                return _Neighbour(name, None, describe(node))
            what = f"{role} {_kind(module)} '{name}'"
            refusal = None
            if consumers:
                refusal = f"{what} output has other consumers ({', '.join(consumers)})"
            elif target in read_directly:
                refusal = f"{what} has its weights read directly elsewhere in the graph"
            return _Neighbour(name, module, describe(node), refusal, graph_calls[target])

        for node in nodes:
            bn = modules.get(str(node.target)) if node.op == "call_module" else None
            if not isinstance(bn, _BatchNorm):
                continue
            name, source = _join(prefix, str(node.target)), node.args[0] if node.args else None
            if not isinstance(source, fx.Node) or len(node.args) > 1 or node.kwargs:
                self.report.kept.append(KeptBN(name, "BN is called with unusual arguments"))
                continue
            before = neighbour(source, "preceding", [u.name for u in source.users if u != node])
            users = list(node.users)
            if len(users) == 1 and users[0].args == (node,) and not users[0].kwargs:
                after = neighbour(users[0], "following", [])
            elif len(users) == 1:
                after = _Neighbour("", None, f"output goes to {describe(users[0])}")
            else:
                after = _Neighbour("", None, f"its output has {len(users)} consumers")
            if self.decide(bn, name, before, after):
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
                gm.delete_submodule(str(node.target))
        gm.graph.lint()
        gm.recompile()
        return gm

    def _fold_untraced(self, module: nn.Module, prefix: str, why: str) -> None:
        for name, child in list(module.named_children()):
            has_bn = any(isinstance(m, _BatchNorm) for m in child.modules())
            if has_bn and not isinstance(child, _BatchNorm | _ConvNd | nn.Linear):
                replacement = self.fold_module(child, _join(prefix, name))
                if replacement is not child:
                    setattr(module, name, replacement)
        if type(module).forward is nn.Sequential.forward:
            self._fold_sequence(module, prefix)
            return
        owner = f"'{prefix or '<model>'}' ({type(module).__name__})"
        for name, child in module.named_children():
            if isinstance(child, _BatchNorm):
                reason = (
                    f"inside {owner}, which torch.fx cannot trace ({why}): its data flow "
                    "is unknown (only consecutive nn.Sequential children fold there)"
                )
                self.report.kept.append(KeptBN(_join(prefix, name), reason))

    def _fold_sequence(self, seq: nn.Module, prefix: str) -> None:
        items = list(seq.named_children())
        where = f"nn.Sequential '{prefix or '<model>'}'"

        def neighbour(i: int, end: str) -> _Neighbour:
            if not 0 <= i < len(items):
                return _Neighbour("", None, f"the {end} of {where}")
            name, child = items[i]
            full = _join(prefix, name)
            return _Neighbour(
                full, child if _is_layer(child) else None, f"'{full}' ({type(child).__name__})"
            )

        for i, (name, child) in enumerate(items):
            if isinstance(child, _BatchNorm) and self.decide(
                child, _join(prefix, name), neighbour(i - 1, "start"), neighbour(i + 1, "end")
            ):
                setattr(seq, name, nn.Identity())


def fold_batchnorm(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, FoldReport]:
    """Return an eval-mode copy of ``model`` with BN folded into neighbouring layers, and a report.

    The copy's eval outputs equal ``model.eval()``'s up to float rounding; the
    caller's model (weights, buffers, training flags) is not touched. Folded BN
    modules are gone from the result, so counting BatchNorm modules there counts
    the kept ones. A BN that is in training mode in ``model`` is kept, and stays
    in training mode in the copy. Folded weights are computed in float64 from
    the original weights and cast once: to ``dtype`` when given (the whole copy
    is then cast to ``dtype``), else to each parameter's own dtype.

    ``example_inputs`` (a tensor or a tuple of positional inputs) is run through
    the copy once, without gradients, to learn activation shapes and call counts.
    Raises :class:`FoldError` naming the module where that run failed.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    work = copy.deepcopy(model)
    training_bns = {
        id(c)
        for m, c in zip(model.modules(), work.modules(), strict=True)
        if isinstance(m, _BatchNorm) and m.training
    }
    work.eval()
    folder = _Folder(_probe(work, inputs), training_bns)
    if isinstance(work, _BatchNorm):  # tracing would turn it into a functional call
        folder.report.kept.append(KeptBN("<model>", "the model is a single BN: nothing to fold"))
    result = work if isinstance(work, _BatchNorm) else folder.fold_module(work, "")
    folder.write_weights(dtype)
    result.eval()
    for m in result.modules():
        if id(m) in training_bns:
            m.train()
    if dtype is not None:
        result.to(dtype)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    folder.report.folded.sort(key=lambda f: order.get(f.bn, len(order)))
    folder.report.kept.sort(key=lambda k: order.get(k.bn, len(order)))
    return result, folder.report
