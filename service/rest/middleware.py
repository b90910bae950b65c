"""HTTP plumbing around every request: request id, size limit, access log.

:class:`RequestContextMiddleware` is plain ASGI (no per-request task or body
copy, unlike ``BaseHTTPMiddleware``): it accepts or generates ``X-Request-ID``
(:func:`~service.observability.logs.new_request_id`), echoes it, makes it visible to logging,
refuses a declared ``Content-Length`` over the limit before the body is sent,
queues one access-log line (:func:`~service.observability.logs.log_access`), and adds
``Connection: close`` while the worker drains (:mod:`service.process.drain`).
"""

from __future__ import annotations

import re
import time

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    error_response,
)
from service.observability.logs import log_access, new_request_id, request_id_var
from service.process.drain import Drain

REQUEST_ID_HEADER = b"x-request-id"
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def header(scope: Scope, name: bytes) -> str | None:
    """A request header straight from the ASGI scope (``name`` lower-case): cheaper than
    building ``request.headers``, and these run per request."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_request_bytes: int,
        access_log: bool = True,
        drain: Drain | None = None,
    ) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.access_log = access_log
        self.drain = drain or Drain(0.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = header(scope, REQUEST_ID_HEADER)
        request_id = given if given and VALID_REQUEST_ID.fullmatch(given) else new_request_id()
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (REQUEST_ID_HEADER, request_id.encode()),
                ]
                if self.drain.draining:  # the client must not reuse this connection
                    message["headers"].append((b"connection", b"close"))
            await send(message)

        try:
            declared = header(scope, b"content-length")
            if (
                declared is not None
                and declared.isdigit()
                and int(declared) > self.max_request_bytes
            ):
                response = error_response(
                    413,
                    f"request body of {declared} bytes exceeds the limit of "
                    f"{self.max_request_bytes} bytes",
                )
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            if self.access_log:
                ms = (time.perf_counter() - start) * 1e3
                log_access(scope["method"], scope["path"], status, ms, request_id)
            request_id_var.reset(token)


def request_id(request: Request) -> str:
    """The id the middleware gave this request."""
    return str(request.scope.get("state", {}).get("request_id", ""))
