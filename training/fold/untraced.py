"""Folding in a module that torch.fx cannot trace: recurse into its children.

Without a graph the data flow is unknown, except in an ``nn.Sequential``, whose
children run one after the other, so only there do BN children fold.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from foldserve.model_format import KeptBatchNorm
from training.fold.layer_forward import base_layer
from training.fold.rules import BatchNormFolder, Neighbour, qualified_name

FoldModule = Callable[[nn.Module, str], nn.Module]
"""Folds inside a module (its qualified name given) and returns what replaces it."""


def fold_untraced(
    folder: BatchNormFolder, module: nn.Module, prefix: str, why: str, fold_child: FoldModule
) -> None:
    """Fold inside ``module``, which torch.fx cannot trace (``why``), in place.

    Children holding a BN go through ``fold_child`` (traced on their own when
    they can be) and are replaced by what it returns. In an ``nn.Sequential``,
    consecutive ``layer -> BN`` / ``BN -> layer`` children fold, the BN becoming
    ``nn.Identity``; any other direct BN child is kept, with ``why`` in its reason.
    """
    for name, child in list(module.named_children()):
        has_bn = any(isinstance(m, _BatchNorm) for m in child.modules())
        if has_bn and not isinstance(child, _BatchNorm | _ConvNd | nn.Linear):
            replacement = fold_child(child, qualified_name(prefix, name))
            if replacement is not child:
                setattr(module, name, replacement)
    if type(module).forward is nn.Sequential.forward:
        _fold_sequence(folder, module, prefix)
        return
    owner = f"'{prefix or '<model>'}' ({type(module).__name__})"
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            reason = (
                f"inside {owner}, which torch.fx cannot trace ({why}): its data flow "
                "is unknown (only consecutive nn.Sequential children fold there)"
            )
            folder.report.kept.append(KeptBatchNorm(bn=qualified_name(prefix, name), reason=reason))


def _fold_sequence(folder: BatchNormFolder, seq: nn.Module, prefix: str) -> None:
    items = list(seq.named_children())
    where = f"nn.Sequential '{prefix or '<model>'}'"

    def neighbour(i: int, end: str) -> Neighbour:
        if not 0 <= i < len(items):
            return Neighbour("", None, f"the {end} of {where}")
        name, child = items[i]
        full = qualified_name(prefix, name)
        layer = child if base_layer(child) is not None else None
        return Neighbour(full, layer, f"'{full}' ({type(child).__name__})")

    for i, (name, child) in enumerate(items):
        if isinstance(child, _BatchNorm) and folder.decide(
            child, qualified_name(prefix, name), neighbour(i - 1, "start"), neighbour(i + 1, "end")
        ):
            setattr(seq, name, nn.Identity())
