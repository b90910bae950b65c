"""A batch-1 V2 inference request, made from a model's metadata and sent straight into the
ASGI app in-process: no socket, no HTTP parser. Shared by app_overhead.py and app_tail.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
from starlette.types import ASGIApp, Message


def request_body(
    repository: Path, model: str, binary: bool
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A batch-1 V2 request for ``model``'s single input, from its latest metadata.json:
    the body and its headers (content-length included)."""
    versions = sorted(int(p.name) for p in (repository / model).iterdir() if p.name.isdigit())
    meta = json.loads((repository / model / str(versions[-1]) / "metadata.json").read_text())
    spec = meta["inputs"][0]
    shape = [1, *spec["shape"][1:]]
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    if not binary:
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": spec["name"],
                        "shape": shape,
                        "datatype": "FP32",
                        "data": x.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        headers = [(b"content-type", b"application/json")]
    else:
        raw = x.astype("<f4").tobytes()
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": spec["name"],
                        "shape": shape,
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        body = head + raw
        headers = [(b"inference-header-content-length", str(len(head)).encode())]
    return body, [(b"content-length", str(len(body)).encode()), *headers]


async def post(
    app: ASGIApp, path: str, body: bytes, headers: list[tuple[bytes, bytes]]
) -> list[Message]:
    """POST ``body`` to ``path`` as one HTTP/1.1 request from 127.0.0.1; the ASGI messages
    the app sent back (``[0]`` carries the status). The client never disconnects."""
    sent: list[Message] = []
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Any:
        if pending:
            return pending.pop()
        await asyncio.sleep(3600)  # the client never disconnects

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return sent
