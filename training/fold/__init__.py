"""Fold eval-mode BatchNorm into the Conv, ConvTranspose or Linear layer beside it.

:func:`fold_batchnorm` rewrites the ``torch.fx`` graph of a deep copy. A BN folds
*backward* into the layer feeding it (preferred), or into each producer of a
channel concat feeding it, or *forward* into the Linear or zero-padding Conv it
feeds; otherwise it is kept, with the reason, in the :class:`FoldReport`. A layer
subclass with a forward of its own (same-padding convs) is folded into once that
forward is proved to be torch's op on its own weights. Shapes, call counts and
those proofs come from one run on ``example_inputs`` (forward hooks), so
untraceable models work too: their traceable submodules are folded by graph
rewrite, and within an untraceable ``nn.Sequential`` consecutive children
``layer -> BN`` / ``BN -> layer`` fold (the BN child becoming ``nn.Identity``).

The package: :mod:`~training.fold.probe` makes that run, reading each layer's
forward with :mod:`~training.fold.layer_forward`; :mod:`~training.fold.rules`
decides whether each fold is exact and stages its weight edits (the math is in
:mod:`~training.fold.weights`); :mod:`~training.fold.graph` folds in a traced
graph, :mod:`~training.fold.untraced` in a module torch.fx cannot trace;
:mod:`~training.fold.report` is what callers get.
"""

from __future__ import annotations

import copy
import logging
from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from foldserve.model_format import KeptBatchNorm
from training.fold.graph import fold_graph, trace_for_folding
from training.fold.probe import FoldError, probe_model
from training.fold.report import FoldReport
from training.fold.rules import BatchNormFolder
from training.fold.untraced import fold_untraced

__all__ = ["FoldError", "FoldReport", "fold_batchnorm"]

log = logging.getLogger(__name__)


def _fold_module(folder: BatchNormFolder, module: nn.Module, prefix: str) -> nn.Module:
    """Fold inside ``module`` (qualified name ``prefix``); returns what replaces it."""
    try:
        graph = trace_for_folding(module)
    except Exception as exc:  # any trace failure: fold the parts that can be traced
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.info("torch.fx cannot trace %r (%s); folding its children", prefix, why)
        fold_untraced(folder, module, prefix, why, partial(_fold_module, folder))
        return module
    return fold_graph(folder, module, graph, prefix)


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
    folder = BatchNormFolder(probe_model(work, inputs), training_bns)
    if isinstance(work, _BatchNorm):  # tracing would turn it into a functional call
        folder.report.kept.append(
            KeptBatchNorm(bn="<model>", reason="the model is a single BN: nothing to fold")
        )
    result = work if isinstance(work, _BatchNorm) else _fold_module(folder, work, "")
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
    return result, folder.report.described(model)
