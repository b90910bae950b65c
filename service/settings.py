"""Service configuration: one pydantic-settings class, read once.

Values come, in rising priority, from defaults, a ``.env`` file, ``FOLDSERVE_*``
environment variables and the keyword arguments given to :class:`Settings`
(``python -m service`` passes its command-line flags that way).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ProviderChoice = Literal["auto", "cuda", "cpu"]
IOBindingChoice = Literal["auto", "on", "off"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]


class Settings(BaseSettings):
    """Everything the service reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix="FOLDSERVE_", env_file=".env", extra="ignore", frozen=True
    )

    repository: Path = Field(default=Path("models"), description="model repository directory")
    host: str = Field(default="127.0.0.1", description="address to bind")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port (0: any free port)")
    grpc_port: int = Field(
        default=8001,
        ge=0,
        le=65535,
        description="gRPC port (Triton's GRPCInferenceService) on the same host, served by "
        "every worker (0: no gRPC)",
    )
    health_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="port that answers GET /v2/health/live from a thread of the supervising "
        "process, also while every worker is still loading and none listens on the serving "
        "port (0: off; liveness is then on the serving port only)",
    )
    worker_start_timeout: float = Field(
        default=300.0,
        gt=0.0,
        description="seconds a replacement worker may take to load its models during a "
        "rolling restart (SIGHUP to the supervisor) before the restart stops there",
    )
    providers: ProviderChoice = Field(
        default="auto",
        description="ONNX Runtime provider: auto (CUDA when it really runs), cuda, cpu",
    )
    threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime intra-op threads per session (0: CPUs usable here)",
    )
    io_binding: IOBindingChoice = Field(
        default="auto", description="ONNX Runtime IO binding: auto (on with CUDA), on, off"
    )
    max_request_bytes: int = Field(
        default=64 * 1024 * 1024,
        gt=0,
        description="largest accepted request body in bytes (413 beyond)",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="when set, repository load/unload and fold-latency need this key, "
        "as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
    )
    open_management: bool = Field(
        default=False,
        description="without an API key, allow repository load/unload on a non-loopback "
        "listener too (by default they answer 403 there)",
    )
    log_format: LogFormat = Field(default="text", description="log line format: text or json")
    log_level: LogLevel = Field(default="info", description="root log level")
    access_log: bool = Field(default=True, description="log one line per HTTP request")
    fold_latency_max_seconds: float = Field(
        default=60.0,
        gt=0.0,
        le=3600.0,
        description="a fold-latency measurement stops timing after this many seconds",
    )
    runtime_dir: Path | None = Field(
        default=None,
        description="writable directory the worker processes keep in step through "
        "(management decisions, metrics, fold-latency reports) (default: a fresh "
        "temporary directory per server)",
    )
    drain_seconds: float = Field(
        default=5.0,
        ge=0.0,
        le=600.0,
        description="after SIGTERM, seconds a worker keeps serving with readiness 503 and "
        "Connection: close before it stops accepting (in-flight requests finish after)",
    )
    header_timeout: float = Field(
        default=10.0,
        gt=0.0,
        le=600.0,
        description="seconds a client has to send a request's headers, from its connection "
        "or the request's first byte (408 and close past it)",
    )
    body_timeout: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description="seconds a client has to send a request's body once its headers are in, "
        "not counting time the server holds the body back (408 and close past it)",
    )
    max_connections: int = Field(
        default=0,
        ge=0,
        description="open connections per worker; past it the longest-idle keep-alive "
        "connection is closed, or else the new one refused with 503 (0: from the "
        "process's descriptor limit)",
    )
    poll_interval: float = Field(
        default=0.0, ge=0.0, description="seconds between repository rescans (0: off)"
    )
    workers: int = Field(
        default=0,
        ge=0,
        description="server processes (0: one per usable CPU, at most 8)",
    )
    batching: bool = Field(
        default=True,
        description="dynamic batching: gather concurrent requests into one ONNX Runtime call",
    )
    max_batch_size: int = Field(
        default=32, ge=1, description="most samples in one batched ONNX Runtime call"
    )
    max_queue_delay_us: int = Field(
        default=0,
        ge=0,
        description="microseconds a partial batch may wait for more requests while the "
        "model is idle (requests that arrive while it runs batch up anyway)",
    )
    max_queue_size: int = Field(
        default=4096,
        ge=1,
        description="requests of one model each worker holds at once, in progress or "
        "waiting in line; beyond it 503 with Retry-After, before the body is read",
    )
    max_concurrency: int = Field(
        default=0,
        ge=0,
        description="requests of one model each worker works on at once (decoding, "
        "queued, running, encoding); the others wait in line with their body read, not "
        "decoded (0: twice max_batch_size)",
    )
    latency_target_ms: float = Field(
        default=0.0,
        ge=0.0,
        description="the latency (ms, the p99 from arrival to answer) every model must meet "
        "unless its config.json sets latency_target_ms: a request's deadline is its arrival "
        "plus the smaller of this and its own timeout; one that would miss it is refused "
        "(503) instead of served late (0: none)",
    )
    request_timeout_ms: float = Field(
        default=0.0,
        ge=0.0,
        description="default per-request deadline from arrival to dispatch, 503 past it "
        "(0: none; a request's parameters.timeout in microseconds overrides it)",
    )

    @field_validator("api_key", mode="after")
    @classmethod
    def _empty_key_is_no_key(cls, value: SecretStr | None) -> SecretStr | None:
        # FOLDSERVE_API_KEY= (empty) must not become a key that an empty header matches.
        return value if value is not None and value.get_secret_value() else None


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def management_policy(settings: Settings) -> str | None:
    """None when repository management may run for this request; else why it may not.

    With an API key, the key decides (checked per request). Without one, management
    is open on a loopback listener (``make run``) or when ``open_management`` is set,
    and closed otherwise: one anonymous request could unload every model.
    """
    if settings.api_key is not None or settings.open_management:
        return None
    if settings.host in LOOPBACK_HOSTS or settings.host.startswith("127."):
        return None
    return (
        f"repository management is off: the server listens on {settings.host} and no API "
        "key is set; set FOLDSERVE_API_KEY (then send it as 'Authorization: Bearer KEY'), "
        "or FOLDSERVE_OPEN_MANAGEMENT=true to open it to anyone who reaches the port"
    )


def describe_management(settings: Settings) -> str:
    """The start-up log line: how repository management is guarded."""
    if settings.api_key is not None:
        return "repository management (load/unload) needs the API key"
    refused = management_policy(settings)
    if refused is not None:
        return refused
    if settings.open_management:
        return "repository management (load/unload) is open to anyone (open_management)"
    return f"repository management (load/unload) is open on the loopback listener {settings.host}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings from the environment (cached: read once)."""
    return Settings()
