"""Domain errors that carry their HTTP status, and the ``{"error": "..."}`` body they become.

Code raises these where a problem is detected, with a message a client can act
on. :func:`install_error_handlers` turns them (and the framework's own errors)
into ``{"error": "..."}`` bodies, the shape Triton and KServe clients read;
:func:`error_response` and :func:`service_error_response` build the same body
where an answer is written outside an exception handler (the middleware, the
infer route). Two transports map the status themselves: ``service.rest.connections``
writes the body as raw HTTP for refusals before a request reaches the app, and
``service.grpc.status`` turns the status into a gRPC code.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of all errors a request can cause; ``status_code`` is the HTTP status."""

    status_code = 500

    def __init__(
        self,
        message: str,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers
        self.details = details  # more fields for the body, beside "error"


class BadRequest(ServiceError):
    """Malformed body, unknown tensor name, wrong shape or datatype."""

    status_code = 400


class Unauthorized(ServiceError):
    """A protected route called without the configured API key."""

    status_code = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    """A route that is switched off for this server's configuration."""

    status_code = 403


class ModelNotFound(ServiceError):
    """No such model, or no such version of a model."""

    status_code = 404


class PayloadTooLarge(ServiceError):
    """The request body exceeds ``max_request_bytes``."""

    status_code = 413


class UnsupportedMediaType(ServiceError):
    """A Content-Encoding the service cannot decode."""

    status_code = 415


class ModelNotReady(ServiceError):
    """The model cannot serve *yet*: the repository is still loading, or the version was
    swapped out while the request waited. Transient: a retry soon can succeed."""

    status_code = 503


class ModelUnavailable(ServiceError):
    """The model exists but has no version that can serve: unloaded, failed to load, or
    excluded by its version policy. Not transient (a retry does not help until someone
    loads it), so 400, as Triton answers, and not 503, which clients and load balancers
    read as "retry soon"."""

    status_code = 400


class LoadFailed(ServiceError):
    """A repository load left a version of the model unable to serve (Triton answers 400
    too); the body lists every version's state and reason."""

    status_code = 400


class WorkersOutOfStep(ServiceError):
    """A management change was applied here, but another worker process has not applied it
    in time or serves different versions."""

    status_code = 503


class QueueFull(ServiceError):
    """The model version's queue holds ``max_queue_size`` requests: retry later."""

    status_code = 503


class RequestTimeout(ServiceError):
    """The request's deadline passed before it was dispatched, or its batch would end past
    it: answered at once and never computed. 503 (gRPC UNAVAILABLE), "Request timeout
    expired", as Triton answers a request whose queue timeout passes."""

    status_code = 503


class DeadlineUnreachable(ServiceError):
    """Refused at arrival: the work already ahead of the request, at the run time measured,
    would carry it past its deadline (503 with Retry-After, before its body is read)."""

    status_code = 503


class ClientDisconnected(ServiceError):
    """The client went away while its request waited (nginx's 499: never seen by anyone)."""

    status_code = 499


class MeasurementBusy(ServiceError):
    """Another fold-latency measurement is running (one at a time: they share the CPUs)."""

    status_code = 429


class NotMeasurable(ServiceError):
    """The version cannot be measured: its unfolded file is missing or changed on disk,
    or its inputs have dynamic axes with no size to draw."""

    status_code = 409


class NoReportYet(ServiceError):
    """``cached=true`` for a model that has not been measured since the server started."""

    status_code = 404


def error_response(
    status_code: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    details: Mapping[str, Any] | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"error": message, **(details or {})}, status_code=status_code, headers=headers
    )


def service_error_response(err: ServiceError) -> JSONResponse:
    """The one mapping of a :class:`ServiceError` to its response."""
    return error_response(err.status_code, err.message, err.headers, err.details)


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item.get("loc", ()))
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


# ``/v1/models/NAME/predict``: the V1 route with a slash where KServe puts a colon.
V1_SLASH_PREDICT = re.compile(r"/v1/models/([^/]+)/predict")


def route_hint(method: str, path: str) -> str | None:
    """What a client that reached no route probably meant, for the routes people mistype."""
    found = V1_SLASH_PREDICT.fullmatch(path)
    if found is None:
        return None
    return (
        f"no route {method} {path}: V1 predict is POST /v1/models/{found.group(1)}:predict "
        "(a colon before 'predict', not a slash)"
    )


HTTP_METHODS = ("get", "head", "post", "put", "patch", "delete")


def _method_not_allowed(request: Request, starlette_allow: str) -> JSONResponse:
    """405 with every method of the path in ``Allow``. Starlette names only those of the
    first route that matched (``OPTIONS /v2/repository/index`` said ``Allow: GET``, though
    the index takes POST too); here they are the methods the API schema declares for the
    most specific path template that matches (``/v1/models/{name}:predict`` over
    ``/v1/models/{name}``), or Starlette's where the schema has none."""
    path = request.url.path
    best: tuple[int, list[str]] | None = None
    for template, operations in request.app.openapi()["paths"].items():
        if compile_path(template)[0].match(path):
            literal = len(re.sub(r"{[^}]*}", "", template))
            methods = [m.upper() for m in HTTP_METHODS if m in operations]
            if methods and (best is None or literal > best[0]):
                best = (literal, methods)
    allow = ", ".join(best[1]) if best is not None else starlette_allow
    return error_response(
        405, f"method {request.method} is not allowed on {path}; it takes {allow}", {"Allow": allow}
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to ``{"error": ...}`` with its status; log unexpected ones."""

    async def on_service_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return service_error_response(exc)

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, _validation_message(exc))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            hint = route_hint(request.method, request.url.path)
            if hint is not None:
                return error_response(404, hint)
        if exc.status_code == 405:
            return _method_not_allowed(request, (exc.headers or {}).get("Allow", ""))
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal server error: {type(exc).__name__}")

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
