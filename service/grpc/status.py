"""The gRPC status code of each data plane error (Triton's mapping)."""

from __future__ import annotations

import grpc

from service.errors import ClientDisconnected, ModelUnavailable, ServiceError

# gRPC status of each HTTP status the data plane's errors carry (Triton's mapping).
HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(err: ServiceError) -> grpc.StatusCode:
    """The gRPC code of a data plane error. A model with no ready version is UNAVAILABLE
    here, as Triton answers over gRPC (REST says 400: it is not transient)."""
    if isinstance(err, ModelUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(err, ClientDisconnected):
        return grpc.StatusCode.CANCELLED
    return HTTP_TO_GRPC.get(err.status_code, grpc.StatusCode.INTERNAL)
