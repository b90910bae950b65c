"""``python -m service``: command-line flags -> Settings -> uvicorn.

Every flag overrides its ``FOLDSERVE_*`` environment variable (and ``.env``);
a flag left out keeps the environment's value.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.logs import configure_logging
from service.settings import Settings


def parse_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The flags given on the command line, as Settings field overrides."""
    parser = argparse.ArgumentParser(
        prog="python -m service", description="Serve the folded models of a FoldServe repository."
    )
    parser.add_argument("--repository", help="model repository directory (FOLDSERVE_REPOSITORY)")
    parser.add_argument("--host", help="address to bind (FOLDSERVE_HOST)")
    parser.add_argument("--port", type=int, help="TCP port (FOLDSERVE_PORT)")
    parser.add_argument(
        "--providers",
        choices=["auto", "cuda", "cpu"],
        help="ONNX Runtime provider (FOLDSERVE_PROVIDERS)",
    )
    parser.add_argument("--threads", type=int, help="intra-op threads, 0: auto (FOLDSERVE_THREADS)")
    parser.add_argument(
        "--io-binding",
        choices=["auto", "on", "off"],
        help="ONNX Runtime IO binding (FOLDSERVE_IO_BINDING)",
    )
    parser.add_argument(
        "--max-request-bytes", type=int, help="largest request body (FOLDSERVE_MAX_REQUEST_BYTES)"
    )
    parser.add_argument("--log-format", choices=["text", "json"], help="FOLDSERVE_LOG_FORMAT")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="FOLDSERVE_LOG_LEVEL"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        help="seconds between repository rescans, 0: off (FOLDSERVE_POLL_INTERVAL)",
    )
    args = parser.parse_args(argv)
    return {key: value for key, value in vars(args).items() if value is not None}


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = Settings(**parse_args(argv))
    except ValidationError as err:
        raise SystemExit(f"python -m service: invalid settings\n{err}") from err
    configure_logging(settings.log_format, settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # the request middleware logs each request with its id
        server_header=False,
    )


if __name__ == "__main__":
    main()
