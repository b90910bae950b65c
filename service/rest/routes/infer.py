"""Inference routes: V2 infer (JSON and binary tensors) and V1 predict.

Each route is registered once, as a :class:`PlainRoute`, and OpenAPI documents
it from that declaration. FastAPI's per-request dependency solving and the
depth of its middleware stack cost more than decoding, batching and encoding a
small model's request together, and these routes need neither (their
parameters are path strings, their bodies are read by :mod:`service.rest.exchange`), so
:class:`PlainRouteDispatch` hands a matching request straight to its route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service.dataplane.plane import DataPlane
from service.errors import ServiceError, service_error_response
from service.protocol import (
    InferRequest,
    InferResponse,
    PredictRequest,
    PredictResponse,
    error_responses,
    request_body_openapi,
)
from service.rest.exchange import RestExchange


class PlainRoute(APIRoute):
    """An APIRoute whose endpoint is called as ``endpoint(request, **path_params)``.

    OpenAPI reads the endpoint's signature and the route's declaration as for
    any route. At run time the route skips what these endpoints never use:
    dependency solving, response-model serialization, FastAPI's exit stacks.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        call: Callable[..., Awaitable[Response]] = endpoint

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            response = await call(Request(scope, receive, send), **scope["path_params"])
            await response(scope, receive, send)

        self.app = app


class PlainRouteDispatch:
    """ASGI middleware: a request that a :class:`PlainRoute` matches fully (path and
    method) goes straight to that route, ahead of the framework's middleware and router.

    The routes are the app's own (registered once, matched by their own
    patterns); a :class:`ServiceError` gets the app's one mapping
    (:func:`service_error_response`); any other exception goes on to the app's
    500 handler; every other request (another method on these paths, too) goes
    through the app as usual. That stack's depth is a measurable share of a small
    model's request (``docs/throughput.md``).
    """

    def __init__(self, app: ASGIApp, routes: list[PlainRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self.routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    try:
                        await route.app(scope, receive, send)
                    except ServiceError as err:
                        await service_error_response(err)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


INFER_DOCS: dict[str, Any] = {
    "response_model": InferResponse,
    "responses": error_responses(400, 404, 413, 415, 503),
    "openapi_extra": request_body_openapi(InferRequest, binary=True),
}


async def _answer(request: Request, name: str, version: str | None, v1: bool) -> Response:
    """One inference request, V2 or V1 (whose instances become a V2 request)."""
    dataplane: DataPlane = request.app.state.dataplane
    return await dataplane.infer(name, version, RestExchange(request, v1), "rest")


async def infer(request: Request, name: str) -> Response:
    """Run the highest ready version (JSON, or binary tensors after a JSON header)."""
    return await _answer(request, name, None, v1=False)


async def infer_version(request: Request, name: str, version: str) -> Response:
    """Run one specific version."""
    return await _answer(request, name, version, v1=False)


async def predict(request: Request, name: str) -> Response:
    """V1: ``{"instances": [...]}``, one entry per sample, for single-input models.

    The instances become a V2 request for the model's one input, every output. The
    answer is ``{"predictions": [...]}`` (the outputs' rows, e.g. logits), plus
    ``"labels"``: each instance's predicted class name, when the model has labels.
    """
    return await _answer(request, name, None, v1=True)


def install(app: FastAPI) -> None:
    """Register the inference routes on ``app`` and dispatch them ahead of its stack.

    Call before adding the request middleware (request id, size limit, access
    log), which must wrap the dispatch.
    """
    add = partial(app.router.add_api_route, tags=["inference"], route_class_override=PlainRoute)
    add("/v2/models/{name}/infer", infer, methods=["POST"], **INFER_DOCS)
    add("/v2/models/{name}/versions/{version}/infer", infer_version, methods=["POST"], **INFER_DOCS)
    add(
        "/v1/models/{name}:predict",
        predict,
        methods=["POST"],
        response_model=PredictResponse,
        responses=error_responses(400, 404, 413, 415, 503),
        openapi_extra=request_body_openapi(PredictRequest),
    )
    routes = [route for route in app.router.routes if isinstance(route, PlainRoute)]
    app.add_middleware(PlainRouteDispatch, routes=routes)
