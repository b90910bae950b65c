"""A model directory's optional ``config.json``: version policy and batching (Triton's keys),
the latency the model must meet (``latency_target_ms``) and which variant serves
(``"variant": "int8"``: ``model.int8.onnx``).

Written by operators, read by the service only; see ``docs/model-repository.md``.
Everything wrong with it raises :class:`ModelVersionError` with a reason that is
shown in the repository index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from foldserve.model_format import ModelVersionError, Variant
from service.settings import Settings

CONFIG_FILE = "config.json"


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
    latency_target_ms: float | None = None


@dataclass(frozen=True)
class BatchingConfig:
    """How one model version batches; the server's settings, then its ``config.json``."""

    enabled: bool
    max_batch_size: int  # samples per call
    max_queue_delay_us: int  # how long an idle model holds a partial batch
    max_queue_size: int  # requests in progress or waiting in line, beyond which 503
    max_concurrency: int = 0  # requests past the entry at once (0: twice max_batch_size)
    latency_target_s: float | None = None  # the p99 the model must meet (None: none)

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchingConfig:
        return cls(
            settings.batching,
            settings.max_batch_size,
            settings.max_queue_delay_us,
            settings.max_queue_size,
            settings.max_concurrency,
            settings.latency_target_ms / 1e3 or None,
        )

    @property
    def admission_limit(self) -> int:
        """Requests worked on at once: enough for the batch that runs and the next one that
        gathers, never more than the queue may hold."""
        return min(self.max_concurrency or 2 * self.max_batch_size, self.max_queue_size)

    def merged(self, overrides: BatchingOverrides) -> BatchingConfig:
        """This config with a model's ``config.json`` values put over it."""

        def pick(mine: Any, theirs: Any) -> Any:
            return mine if theirs is None else theirs

        return BatchingConfig(
            pick(self.enabled, overrides.enabled),
            pick(self.max_batch_size, overrides.max_batch_size),
            pick(self.max_queue_delay_us, overrides.max_queue_delay_us),
            pick(self.max_queue_size, overrides.max_queue_size),
            self.max_concurrency,
            pick(
                self.latency_target_s,
                None if overrides.latency_target_ms is None else overrides.latency_target_ms / 1e3,
            ),
        )


# The variants config.json may serve: the unfolded file is for comparison, never served.
SERVED_VARIANTS: tuple[Variant, ...] = ("folded", "int8")


@dataclass(frozen=True)
class ModelSettings:
    """What a model directory's optional ``config.json`` says; ``variant``: which file of
    each version serves, ``model.onnx`` ("folded") or ``model.int8.onnx`` ("int8")."""

    policy: VersionPolicy = VersionPolicy()
    batching: BatchingOverrides = BatchingOverrides()
    variant: Variant = "folded"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ModelVersionError(message)


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


def _target(value: Any) -> float | None:
    if value is None:
        return None
    number = type(value) in (int, float) and value == value  # not a bool, not NaN
    _require(
        number and 0 < value <= 3_600_000,
        f"latency_target_ms must be a number of milliseconds > 0, got {value!r}",
    )
    return float(value)


def _batching(config: dict[str, Any]) -> BatchingOverrides:
    dynamic = config.get("dynamic_batching")
    size = _count(config.get("max_batch_size"), "max_batch_size", 1)
    target = _target(config.get("latency_target_ms"))
    if dynamic is None or isinstance(dynamic, bool):
        return BatchingOverrides(enabled=dynamic, max_batch_size=size, latency_target_ms=target)
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
        latency_target_ms=target,
    )


def _variant(value: Any) -> Variant:
    if value is None:
        return "folded"
    for known in SERVED_VARIANTS:
        if value == known:
            return known
    raise ModelVersionError(f"variant must be one of {list(SERVED_VARIANTS)}, got {value!r}")


def read_model_config(model_dir: Path) -> ModelSettings:
    """``model_dir/config.json``: version policy, batching and the variant served (defaults
    when absent)."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return ModelSettings()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelVersionError(f"{CONFIG_FILE} is unreadable: {err}") from err
    _require(isinstance(config, dict), f"{CONFIG_FILE} is not a JSON object")
    return ModelSettings(
        _policy(config.get("version_policy")), _batching(config), _variant(config.get("variant"))
    )
