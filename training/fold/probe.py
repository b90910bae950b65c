"""One eval run of the model on the example inputs, with hooks on every module.

It learns what the graph alone cannot tell: how often each module runs, the
shape of its input, the names it is registered under, which modules hold each
Parameter, and, for every Linear/Conv/ConvTranspose, whether its forward is
torch's op on its own weight and bias (:mod:`training.fold.layer_forward`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from training.fold.layer_forward import ForwardReader, base_layer, static_refusal


class FoldError(ValueError):
    """The model could not be run on ``example_inputs``; the message names the failing module."""


@dataclass
class Probe:
    """What one eval run of the copy on the example inputs saw, keyed by ``id(module)``."""

    names: dict[int, list[str]]  # every qualified name the module is registered under
    calls: Counter[int]
    in_shapes: dict[int, tuple[int, ...]]  # shape of the first call's first tensor argument
    param_owners: dict[int, set[int]]  # id(parameter) -> ids of the modules holding it
    # weight layers that ran: why folding into one cannot be exact, or None when it can
    layer_refusals: dict[int, str | None]


def probe_model(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Probe:
    """Run ``model`` once on ``inputs`` (no gradients) with hooks on every module.

    Raises :class:`FoldError` naming the innermost module that was running when it failed.
    """
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name or "<model>")
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(module))
    # before the probe adds hooks of its own, which static_refusal would count
    layer_refusals = {id(m): static_refusal(m) for m in model.modules() if base_layer(m)}
    read: dict[int, ForwardReader] = {}  # layers whose first call is being read
    calls: Counter[int] = Counter()
    shapes: dict[int, tuple[int, ...]] = {}
    stack: list[int] = []

    def before(module: nn.Module, args: tuple[object, ...]) -> None:
        calls[id(module)] += 1
        stack.append(id(module))
        if args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(id(module), tuple(args[0].shape))
        key = id(module)
        if calls[key] == 1 and key in layer_refusals and layer_refusals[key] is None:
            read[key] = ForwardReader(module)
            read[key].start()

    def after(module: nn.Module, args: tuple[object, ...], out: object) -> None:
        stack.pop()
        if (reader := read.pop(id(module), None)) is not None:
            layer_refusals[id(module)] = reader.finish(out)

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
        for reader in reversed(read.values()):  # the forward raised inside these layers
            reader.abandon()
        for h in handles:
            h.remove()
    ran = {key: why for key, why in layer_refusals.items() if calls[key]}
    return Probe(names, calls, shapes, owners, ran)
