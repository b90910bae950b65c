"""A decoded request checked against the model it asks for (pure functions).

Every transport's request reaches the data plane as a
:class:`~service.dataplane.tensors.DecodedRequest`; :func:`prepare_feeds` checks its
inputs against the served version's specs (names, shapes, the very datatype the
model declares, one batch size) and :func:`select_outputs` the outputs it asks for. Each
problem raises :class:`~service.errors.BadRequest` naming the tensor and what was
expected.
"""

from __future__ import annotations

from foldserve.model_format import TensorSpec
from service.dataplane.tensors import InputTensor, RequestedOutput, cast_exact
from service.errors import BadRequest
from service.models.batch_call import Feeds


def _names(items: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in items)


def prepare_feeds(
    model: str, specs: dict[str, TensorSpec], order: list[TensorSpec], inputs: list[InputTensor]
) -> Feeds:
    """Inputs checked against model ``model``'s ``specs`` (names, shapes, datatype: a
    declared one other than the model's is refused, however exact its values, as Triton
    does); ``order`` is the specs as declared. Raises :class:`BadRequest`."""
    feeds: Feeds = {}
    for tensor in inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise BadRequest(
                f"unknown input '{tensor.name}'; model '{model}' takes {_names(list(specs))}"
            )
        if tensor.name in feeds:
            raise BadRequest(f"input '{tensor.name}' is given twice")
        shape = tensor.array.shape
        if not spec.accepts(shape):
            raise BadRequest(
                f"input '{tensor.name}': expected shape {list(spec.shape)}, got {list(shape)}"
            )
        if spec.shape[:1] == (-1,) and shape[0] == 0:
            raise BadRequest(f"input '{tensor.name}': batch size must be at least 1")
        if tensor.datatype != spec.datatype:  # Triton refuses any mismatch: so do we
            raise BadRequest(
                f"input '{tensor.name}': datatype {tensor.datatype} does not match the "
                f"model's {spec.datatype}; send {spec.datatype}"
            )
        converted = cast_exact(tensor.array, spec.dtype)
        if converted is None:
            raise BadRequest(
                f"input '{tensor.name}': expected datatype {spec.datatype}, got {tensor.datatype} "
                f"values that {spec.datatype} cannot represent exactly"
            )
        feeds[tensor.name] = converted
    missing = [name for name in specs if name not in feeds]
    if missing:
        raise BadRequest(f"missing input(s) {_names(missing)} of model '{model}'")
    if len(feeds) > 1:
        batches = {feeds[s.name].shape[0] for s in order if s.shape[:1] == (-1,)}
        if len(batches) > 1:
            raise BadRequest(f"inputs disagree on the batch size: {sorted(batches)}")
    return feeds


def select_outputs(
    model: str,
    names: list[str],
    requested: list[RequestedOutput] | None,
    every: list[RequestedOutput],
) -> list[RequestedOutput]:
    """The outputs to return: those ``requested`` (checked against ``names``), else ``every``."""
    if requested is None:
        return every
    seen: set[str] = set()
    for wanted in requested:
        if wanted.name not in names:
            raise BadRequest(
                f"unknown output '{wanted.name}'; model '{model}' gives {_names(names)}"
            )
        if wanted.name in seen:
            raise BadRequest(f"output '{wanted.name}' is requested twice")
        seen.add(wanted.name)
    return requested
