"""The REST exchange: one inference request over HTTP, as the data plane handles it.

The data plane (:class:`service.dataplane.plane.DataPlane`) calls a transport back three
times: to read the payload (only after the cheap overload refusal, so a refused request
costs no body read), to decode it for the version chosen, and to encode the answer.
:class:`RestExchange` is REST's side of all three: the body read at the client's pace
(size limit, gzip/deflate), the V2 codec (JSON, or binary tensors after a JSON header,
:mod:`service.rest.codec`) or the V1 ``instances`` form (:mod:`service.rest.v1_codec`),
and the 200 answer (:class:`TensorResponse`). gRPC's twin is
:class:`service.grpc.servicer.GrpcExchange`.
"""

from __future__ import annotations

import zlib

from fastapi import Request, Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from service.dataplane.plane import Inferred
from service.dataplane.tensors import DecodedRequest
from service.errors import BadRequest, ClientDisconnected, PayloadTooLarge, UnsupportedMediaType
from service.models.served_version import ServedVersion
from service.rest.codec import decode_infer_request, encode_infer_response
from service.rest.middleware import header, request_id
from service.rest.v1_codec import encode_v1, v1_request


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body (whatever its Content-Type), decompressed, at most ``max_bytes``.

    Raises 413 past the limit (also for chunked bodies and after decompression),
    415 for an unknown Content-Encoding, 400 for a corrupt compressed body, 499
    (:class:`ClientDisconnected`) when the client has gone.
    """
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect as err:  # e.g. it gave up while its request waited for a turn
        raise ClientDisconnected("the client disconnected before its body was read") from err
    body = b"".join(chunks)
    encoding = (header(request.scope, b"content-encoding") or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported (gzip, deflate)"
        )
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        plain = decoder.decompress(body, max_bytes + 1)
    except zlib.error as err:
        raise BadRequest(f"request body is not valid {encoding}: {err}") from err
    if len(plain) > max_bytes or decoder.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request body exceeds the limit of {max_bytes} bytes")
    if not decoder.eof:
        raise BadRequest(f"request body is truncated {encoding} data")
    return plain


class TensorResponse(Response):
    """A 200 answer with its raw headers written once (these run per request, and Starlette's
    generic header building is a measurable share of a small request)."""

    def __init__(self, body: bytes, header_length: int | None = None) -> None:
        self.status_code = 200
        self.body = body
        self.background = None
        kind = b"application/json" if header_length is None else b"application/octet-stream"
        self.raw_headers = [(b"content-type", kind), (b"content-length", b"%d" % len(body))]
        if header_length is not None:
            self.raw_headers.append((b"inference-header-content-length", b"%d" % header_length))


class RestExchange:
    """An inference request over HTTP for the data plane
    (:class:`service.dataplane.plane.Exchange`): a V2 body (JSON, or binary tensors after
    a JSON header) or a V1 ``instances`` body."""

    __slots__ = ("request", "receive", "v1", "body")
    time_limit_s = None  # HTTP has no deadline header: parameters.timeout is in the body

    def __init__(self, request: Request, v1: bool) -> None:
        self.request = request
        self.receive: Receive | None = request.receive
        self.v1 = v1
        self.body = b""

    async def read(self, max_bytes: int) -> int:
        self.body = await read_body(self.request, max_bytes)
        return len(self.body)

    def decode(self, served: ServedVersion) -> DecodedRequest:
        if self.v1:
            return v1_request(self.body, served.name, served.inputs)
        header_length = header(self.request.scope, b"inference-header-content-length")
        return decode_infer_request(self.body, header_length)

    def encode(self, result: Inferred) -> Response:
        outputs = result.outputs
        if self.v1:
            return TensorResponse(encode_v1(outputs, result.served.labels))
        served = result.served
        answer_id = result.request.id or request_id(self.request)
        encoded = encode_infer_response(served.name, str(served.version), answer_id, outputs)
        return TensorResponse(encoded.body, encoded.header_length)
