"""The model repository contract: layout, names, ``metadata.json``, atomic version writes.

Both sides import this one torch-free module: ``training`` writes versions with
:func:`write_version` and :class:`VersionMetadata`, the service reads them with
:meth:`VersionMetadata.read` and :func:`verified_bytes`, and the test fixtures
write theirs with the same code. See ``docs/model-repository.md``.

Everything that can be wrong with a version's files raises
:class:`ModelVersionError` with a reason that is shown, as is, in the
repository index.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from foldserve.datatypes import NUMPY_DTYPES, V2_DATATYPES, Datatype
from foldserve.files import staged_dir, write_synced

FORMAT = "foldserve-model/1"
FOLDED_FILE = "model.onnx"
# A bare version's one file (no metadata.json): the user's own ONNX model, unfolded. It has
# the name an export gives its folded file (Triton's model file name); the service derives
# the folded twin (service.models.derived).
USER_FILE = "model.onnx"
UNFOLDED_FILE = "model.unfolded.onnx"
INT8_FILE = "model.int8.onnx"  # optional: static INT8 (QDQ) of the folded model
METADATA_FILE = "metadata.json"

# A version directory: a positive integer without leading zeros ("01" is not a version).
VERSION_DIR = re.compile(r"[1-9][0-9]*")
# A model directory: ASCII letters, digits, '_', '-', '.', not starting with '.'.
MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


class ModelVersionError(ValueError):
    """Why a model version (or a whole model) cannot be served."""


def valid_model_name(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None


def version_numbers(model_dir: Path) -> list[int]:
    """The version directories of ``model_dir``, ascending (temporary ones never count)."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir() if VERSION_DIR.fullmatch(p.name) and p.is_dir()
    )


class TensorSpec(BaseModel):
    """A model input or output: V2 datatype and shape, ``-1`` for dynamic axes."""

    model_config = ConfigDict(frozen=True)

    name: str
    datatype: Datatype
    shape: tuple[int, ...]

    @model_validator(mode="after")
    def _dims(self) -> TensorSpec:
        if any(d < -1 for d in self.shape):
            raise ValueError(f"'{self.name}': shape must be integers >= -1 (-1: dynamic)")
        return self

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

    def random(self, rng: np.random.Generator, shape: list[int]) -> np.ndarray:
        """Values to run a model on: floats ~ N(0, 1), integers in [0, 10), fair booleans."""
        kind = self.dtype.kind
        if kind == "f":
            return rng.standard_normal(shape).astype(self.dtype)
        if kind in "iu":
            return rng.integers(0, 10, size=shape).astype(self.dtype)
        return rng.random(shape) < 0.5


class TensorData(BaseModel):
    """A tensor as JSON: ``data`` is the flat row-major list."""

    datatype: Datatype
    shape: list[int]
    data: list[float | int | bool]

    @model_validator(mode="after")
    def _size(self) -> TensorData:
        if math.prod(self.shape) != len(self.data):
            raise ValueError(f"shape {self.shape} and {len(self.data)} values disagree")
        return self

    @classmethod
    def of(cls, array: np.ndarray) -> TensorData:
        return cls(
            datatype=V2_DATATYPES[array.dtype],
            shape=list(array.shape),
            data=array.reshape(-1).tolist(),
        )

    def array(self) -> np.ndarray:
        return np.asarray(self.data, dtype=NUMPY_DTYPES[self.datatype]).reshape(self.shape)


class ReferenceBatch(BaseModel):
    """Inputs, and the outputs the folded model must reproduce within ``atol``."""

    inputs: dict[str, TensorData]
    outputs: dict[str, TensorData]
    atol: float = Field(ge=0)


# The files of a version, by the name the service and the reports give them (VersionFiles'
# fields): model.onnx, model.unfolded.onnx, model.int8.onnx.
Variant = Literal["folded", "unfolded", "int8"]


class VersionFiles(BaseModel):
    folded: str = FOLDED_FILE
    unfolded: str = UNFOLDED_FILE  # "" when the version has no unfolded twin
    int8: str = ""  # INT8_FILE when the version has one


class BatchNormSite(BaseModel):
    bn: str
    bn_type: str = ""  # e.g. "BatchNorm2d", "BatchNormalization", "Mul+Add"
    bn_shape: list[int] = []  # the per-channel parameters' shape


class FoldedBatchNorm(BatchNormSite):
    """One BN folded into a neighbouring layer: "backward" into the layer before it (that
    layer's weights absorb the scale and shift), "forward" into the layer after it."""

    into: str
    direction: str
    into_type: str = ""  # e.g. "Conv2d", "Gemm"
    into_shape: list[int] = []  # the absorbing layer's weight shape


class KeptBatchNorm(BatchNormSite):
    reason: str


class FoldRecord(BaseModel):
    folded: list[FoldedBatchNorm] = []
    kept: list[KeptBatchNorm] = []


class Parity(BaseModel):
    """Folded against unfolded (and against the framework) on ``samples`` inputs."""

    max_abs_diff: float
    max_abs_diff_vs_torch: dict[str, float] = {}
    atol: float
    samples: int
    inputs: str = ""  # what the samples were, e.g. "test split of the run's dataset"


class Calibration(BaseModel):
    """How the INT8 activation ranges were calibrated: ``method`` (ONNX Runtime's
    CalibrationMethod name) chosen by ``chosen_by``, on ``samples`` of ``inputs``;
    ``candidates``: each method tried, with the accuracy (or FP32 agreement) it reached."""

    method: str
    samples: int = Field(ge=1)
    inputs: str
    chosen_by: str = ""
    candidates: dict[str, float] = {}


class Int8Record(BaseModel):
    """``metadata.json`` ``int8``: what ``model.int8.onnx`` is and what it costs.

    Accuracies are fractions in [0, 1] on ``accuracy_samples`` of ``accuracy_inputs``
    (None when those have no labels: then ``agreement`` is what the tolerance held);
    ``tolerance`` is the accuracy loss allowed, in points (0.01 = 1 point).
    ``reference_outputs`` are the INT8 file's own outputs on the version's reference
    inputs: the load-time check of a server that serves this variant.
    """

    format: str = "QDQ"
    weights: str = "INT8, 7-bit range"  # ORT's reduce_range: no AVX2 saturation
    activations: str = "UINT8"
    per_channel: bool = True
    preprocessed: bool = False  # ORT's quant_pre_process ran on the folded model first
    calibration: Calibration
    accuracy: float | None = None
    reference_accuracy: float | None = None
    accuracy_samples: int = 0
    accuracy_inputs: str = ""
    agreement: float = Field(ge=0, le=1)  # argmax agreement with the folded FP32 model
    tolerance: float = Field(ge=0)
    max_abs_diff: float  # against the folded FP32 outputs on the reference batch
    per_tensor_accuracy: float | None = None  # the same model with per-tensor weights
    per_channel_needed: bool | None = None  # per-tensor weights lose more than the tolerance
    qdq_nodes: dict[str, int] = {}
    reference_outputs: dict[str, TensorData]
    reference_atol: float = Field(ge=0)


class VersionMetadata(BaseModel):
    """``metadata.json``: what a version is, how it was made, and how to verify it.

    Keys this model does not know are kept as they are (a newer writer's extras).
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format: Literal["foldserve-model/1"] = "foldserve-model/1"
    name: str
    version: int = Field(default=0, ge=0)  # set by write_version
    created: str = ""
    framework: dict[str, Any] = {}
    files: VersionFiles = VersionFiles()
    sha256: dict[str, str] = {}  # set by write_version
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    labels: list[str] = []  # labels[i] names output column i
    features: list[str] = []  # names of the input's columns, in order ([]: not recorded)
    network: dict[str, Any] | None = Field(  # the zoo config ("model_config" is pydantic's)
        default=None,
        validation_alias=AliasChoices("model_config", "network"),
        serialization_alias="model_config",
    )
    training: dict[str, Any] = {}
    fold_report: FoldRecord = FoldRecord()
    bn_nodes: dict[str, int] = {}
    parity: Parity | None = None
    reference: ReferenceBatch
    int8: Int8Record | None = None  # set when files.int8 names a file

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, indent=1, exclude_none=True).encode()

    @classmethod
    def parse(cls, raw: bytes) -> VersionMetadata:
        """Validate ``metadata.json`` bytes (structure only, not the files it names)."""
        try:
            meta = json.loads(raw)
        except ValueError as err:
            raise ModelVersionError(f"{METADATA_FILE} is unreadable: {err}") from err
        if not isinstance(meta, dict):
            raise ModelVersionError(f"{METADATA_FILE} is not a JSON object")
        fmt = meta.get("format")
        if fmt != FORMAT:
            raise ModelVersionError(f"metadata format {fmt!r} is not {FORMAT!r}")
        try:
            parsed = cls.model_validate(meta)
        except ValidationError as err:
            raise ModelVersionError(f"{METADATA_FILE} is malformed: {_first_error(err)}") from err
        parsed._check_reference()
        return parsed

    @classmethod
    def read(cls, version_dir: Path) -> VersionMetadata:
        """Read and validate ``version_dir/metadata.json``."""
        path = version_dir / METADATA_FILE
        if not path.is_file():
            raise ModelVersionError(f"{METADATA_FILE} is missing")
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise ModelVersionError(f"{METADATA_FILE} is unreadable: {err}") from err
        return cls.parse(raw)

    def _check_reference(self) -> None:
        for key, specs, tensors in (
            ("inputs", self.inputs, self.reference.inputs),
            ("outputs", self.outputs, self.reference.outputs),
        ):
            for spec in specs:
                if spec.name not in tensors:
                    raise ModelVersionError(f"reference {key} lack '{spec.name}'")


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg"))


# -- files -------------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified_bytes(version_dir: Path, filename: str, sha256: dict[str, str]) -> bytes:
    """The bytes of ``version_dir/filename`` once their sha256 matches the metadata.

    Hashing the bytes that will be loaded (not the file twice) leaves no window
    for the file to change between check and use.
    """
    path = version_dir / filename
    if not path.is_file():
        raise ModelVersionError(f"{filename} is missing")
    expected = sha256.get(filename)
    if not isinstance(expected, str):
        raise ModelVersionError(f"metadata has no sha256 for {filename}")
    data = path.read_bytes()
    actual = sha256_hex(data)
    if actual != expected:
        raise ModelVersionError(
            f"sha256 of {filename} is {actual[:12]}..., metadata says "
            f"{expected[:12]}... (file changed or corrupted)"
        )
    return data


def write_version(
    model_dir: Path,
    files: dict[str, bytes],
    metadata: VersionMetadata,
    *,
    version: int | None = None,
) -> int:
    """Write ``files`` and their metadata as a new version of ``model_dir``; its number.

    The sha256 of every file and the version number are filled into the metadata.
    ``version`` claims that number (an error if it exists); None takes the next free one.
    """
    sha = {name: sha256_hex(data) for name, data in files.items()}

    def render(number: int) -> bytes:
        return metadata.model_copy(update={"version": number, "sha256": sha}).to_json()

    return commit_version(model_dir, files, render, version=version)


def commit_version(
    model_dir: Path,
    files: dict[str, bytes],
    metadata_json: Callable[[int], bytes],
    *,
    version: int | None = None,
) -> int:
    """Assemble a version in a ``.tmp-*`` directory and rename it into place (atomic).

    ``metadata_json(number)`` renders ``metadata.json`` for the number being claimed
    (it may change when a concurrent writer takes a number first). A reader never
    sees a half-written version; a failure leaves nothing behind.
    """
    if not valid_model_name(model_dir.name):
        raise ModelVersionError(
            f"bad model name {model_dir.name!r}: use letters, digits, '_', '-', '.' "
            "(not starting with '.')"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    with staged_dir(model_dir) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        for number in _candidates(model_dir, version):
            write_synced(tmp / METADATA_FILE, metadata_json(number))
            try:
                os.rename(tmp, model_dir / str(number))  # atomic; fails if it exists
                return number
            except OSError:
                if version is not None:
                    raise ModelVersionError(f"version {version} of {model_dir} exists") from None
        raise ModelVersionError(f"could not claim a version number in {model_dir}")


def _candidates(model_dir: Path, version: int | None) -> Iterator[int]:
    if version is not None:
        if version < 1:
            raise ModelVersionError(f"version must be a positive integer, got {version}")
        yield version
        return
    for _ in range(100):  # concurrent writers: each retry takes the next free number
        yield (version_numbers(model_dir) or [0])[-1] + 1
