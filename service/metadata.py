"""The repository's file contract, read side: ``metadata.json`` and ``config.json``.

See ``docs/model-repository.md``. Everything that can be wrong with a file
raises :class:`ModelVersionError` with a reason that is shown, as is, in the
repository index; nothing here touches ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.protocol import NUMPY_DTYPES

METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.json"
METADATA_FORMAT = "foldserve-model/1"


class ModelVersionError(ValueError):
    """Why a model version (or a whole model) cannot be served."""


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: V2 datatype and shape, ``-1`` for dynamic axes."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return NUMPY_DTYPES[self.datatype]

    def accepts(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(self.shape):
            return False
        for want, got in zip(self.shape, shape, strict=True):  # a loop: runs per request
            if want != got and want != -1:
                return False
        return True


@dataclass(frozen=True)
class ReferenceBatch:
    """Inputs and the outputs the folded model must reproduce within ``atol``."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    atol: float


@dataclass(frozen=True)
class VersionMetadata:
    name: str
    version: int
    folded_file: str
    unfolded_file: str
    sha256: dict[str, str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    labels: list[str]
    bn_nodes: dict[str, int]
    folded_layers: int
    kept_layers: list[dict[str, str]]
    reference: ReferenceBatch
    raw: dict[str, Any]


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions to serve (Triton's policies): all, the latest N valid, or a list."""

    kind: Literal["all", "latest", "specific"] = "all"
    latest: int = 1
    versions: tuple[int, ...] = ()

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.latest}"
        if self.kind == "specific":
            return f"specific {list(self.versions)}"
        return "all"


@dataclass(frozen=True)
class BatchingOverrides:
    """A model's own batching settings from ``config.json``; None: the server's setting."""

    enabled: bool | None = None
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    max_queue_size: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """What a model directory's optional ``config.json`` says."""

    policy: VersionPolicy = VersionPolicy()
    batching: BatchingOverrides = BatchingOverrides()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ModelVersionError(message)


def _object(value: Any, message: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ModelVersionError(message)
    return value


def _tensor_specs(value: Any, key: str) -> list[TensorSpec]:
    _require(isinstance(value, list) and len(value) > 0, f"metadata '{key}' must be a list")
    specs = []
    for item in value:
        ok = isinstance(item, dict) and isinstance(item.get("name"), str)
        _require(ok, f"metadata '{key}' entries need a 'name'")
        datatype, shape = item.get("datatype"), item.get("shape")
        _require(datatype in NUMPY_DTYPES, f"{key} '{item['name']}': unknown datatype {datatype!r}")
        _require(
            isinstance(shape, list) and all(type(d) is int and d >= -1 for d in shape),
            f"{key} '{item['name']}': shape must be a list of integers (-1: dynamic)",
        )
        specs.append(TensorSpec(item["name"], datatype, tuple(shape)))
    return specs


def _reference_tensors(value: Any, specs: list[TensorSpec], key: str) -> dict[str, np.ndarray]:
    _require(isinstance(value, dict), f"reference '{key}' must be an object")
    arrays = {}
    for spec in specs:
        tensor = value.get(spec.name)
        _require(isinstance(tensor, dict), f"reference {key} lack '{spec.name}'")
        shape, data = tensor.get("shape"), tensor.get("data")
        ok = isinstance(shape, list) and isinstance(data, list) and math.prod(shape) == len(data)
        _require(ok, f"reference {key} '{spec.name}': shape and data disagree")
        dtype = NUMPY_DTYPES.get(tensor.get("datatype", spec.datatype), spec.dtype)
        arrays[spec.name] = np.asarray(data, dtype=dtype).reshape(shape)
    return arrays


def parse_metadata(meta: dict[str, Any]) -> VersionMetadata:
    """Validate a parsed ``metadata.json`` (structure only, not the files)."""
    fmt = meta.get("format")
    _require(fmt == METADATA_FORMAT, f"metadata format {fmt!r} is not {METADATA_FORMAT!r}")
    files = _object(meta.get("files"), "metadata has no 'files' object")
    _require(isinstance(files.get("folded"), str), "metadata has no files.folded")
    sha = _object(meta.get("sha256"), "metadata has no 'sha256' object")
    inputs = _tensor_specs(meta.get("inputs"), "inputs")
    outputs = _tensor_specs(meta.get("outputs"), "outputs")
    ref = _object(meta.get("reference"), "metadata has no 'reference' batch")
    atol = ref.get("atol")
    if not isinstance(atol, int | float) or not atol >= 0:
        raise ModelVersionError("reference.atol must be a number >= 0")
    reference = ReferenceBatch(
        _reference_tensors(ref.get("inputs"), inputs, "inputs"),
        _reference_tensors(ref.get("outputs"), outputs, "outputs"),
        float(atol),
    )
    report = _object(meta.get("fold_report") or {}, "fold_report must be an object")
    kept = [
        {"bn": str(k.get("bn", "?")), "reason": str(k.get("reason", ""))}
        for k in report.get("kept", [])
        if isinstance(k, dict)
    ]
    bn_nodes = _object(meta.get("bn_nodes") or {}, "bn_nodes must be an object")
    return VersionMetadata(
        name=str(meta.get("name", "")),
        version=int(meta.get("version", 0)),
        folded_file=files["folded"],
        unfolded_file=str(files.get("unfolded", "")),
        sha256={str(k): str(v) for k, v in sha.items()},
        inputs=inputs,
        outputs=outputs,
        labels=[str(label) for label in meta.get("labels") or []],
        bn_nodes={str(k): int(v) for k, v in bn_nodes.items()},
        folded_layers=len(report.get("folded", [])),
        kept_layers=kept,
        reference=reference,
        raw=meta,
    )


def read_metadata(version_dir: Path) -> VersionMetadata:
    """Read and validate ``version_dir/metadata.json``."""
    path = version_dir / METADATA_FILE
    _require(path.is_file(), f"{METADATA_FILE} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelVersionError(f"{METADATA_FILE} is unreadable: {err}") from err
    _require(isinstance(meta, dict), f"{METADATA_FILE} is not a JSON object")
    try:
        return parse_metadata(meta)
    except (TypeError, ValueError, AttributeError) as err:
        if isinstance(err, ModelVersionError):
            raise
        raise ModelVersionError(f"{METADATA_FILE} is malformed: {err}") from err


def _policy(value: Any) -> VersionPolicy:
    if value is None or value == {"all": {}}:
        return VersionPolicy()
    if isinstance(value, dict) and isinstance(value.get("latest"), dict):
        n = value["latest"].get("num_versions", 1)
        _require(type(n) is int and n >= 1, "version_policy.latest.num_versions must be >= 1")
        return VersionPolicy("latest", latest=n)
    if isinstance(value, dict) and isinstance(value.get("specific"), dict):
        versions = value["specific"].get("versions")
        ok = isinstance(versions, list) and all(type(v) is int and v > 0 for v in versions)
        _require(ok, "version_policy.specific.versions must be a list of positive integers")
        return VersionPolicy("specific", versions=tuple(versions))
    raise ModelVersionError(
        "version_policy must be {'all': {}}, {'latest': {'num_versions': N}} "
        "or {'specific': {'versions': [...]}}"
    )


def _count(value: Any, key: str, least: int) -> int | None:
    if value is None:
        return None
    _require(type(value) is int and value >= least, f"{key} must be an integer >= {least}")
    return int(value)


def _batching(config: dict[str, Any]) -> BatchingOverrides:
    dynamic = config.get("dynamic_batching")
    size = _count(config.get("max_batch_size"), "max_batch_size", 1)
    if dynamic is None or isinstance(dynamic, bool):
        return BatchingOverrides(enabled=dynamic, max_batch_size=size)
    _require(
        isinstance(dynamic, dict), "dynamic_batching must be true, false or an object of settings"
    )
    known = {"max_queue_delay_microseconds", "max_queue_size"}
    unknown = sorted(set(dynamic) - known)
    _require(not unknown, f"dynamic_batching: unknown key(s) {unknown}; known: {sorted(known)}")
    return BatchingOverrides(
        enabled=True,
        max_batch_size=size,
        max_queue_delay_us=_count(
            dynamic.get("max_queue_delay_microseconds"),
            "dynamic_batching.max_queue_delay_microseconds",
            0,
        ),
        max_queue_size=_count(dynamic.get("max_queue_size"), "dynamic_batching.max_queue_size", 1),
    )


def read_model_config(model_dir: Path) -> ModelConfig:
    """``model_dir/config.json``: version policy and batching (defaults when absent)."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return ModelConfig()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelVersionError(f"{CONFIG_FILE} is unreadable: {err}") from err
    _require(isinstance(config, dict), f"{CONFIG_FILE} is not a JSON object")
    return ModelConfig(_policy(config.get("version_policy")), _batching(config))


def verified_bytes(version_dir: Path, filename: str, sha256: dict[str, str]) -> bytes:
    """The bytes of ``version_dir/filename`` once their sha256 matches the metadata.

    Hashing the bytes that will be loaded (not the file twice) leaves no window
    for the file to change between check and use.
    """
    path = version_dir / filename
    _require(path.is_file(), f"{filename} is missing")
    expected = sha256.get(filename)
    _require(isinstance(expected, str), f"metadata has no sha256 for {filename}")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    _require(
        actual == expected,
        f"sha256 of {filename} is {actual[:12]}..., metadata says "
        f"{str(expected)[:12]}... (file changed or corrupted)",
    )
    return data
