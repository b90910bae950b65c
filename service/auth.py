"""The API key and the management guard, for every transport (REST headers, gRPC metadata).

A key comes as ``authorization: Bearer KEY`` or ``x-api-key: KEY``: HTTP headers or
gRPC metadata, whose names are the same. Repository management is off without a key
on a non-loopback listener (:func:`service.settings.management_policy`).
"""

from __future__ import annotations

import secrets

from service.errors import Forbidden, Unauthorized
from service.settings import Settings, management_policy


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request carries: a Bearer token, else ``x-api-key``; None without one."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return x_api_key or None


def check_api_key(settings: Settings, presented: str | None, what: str, how: str) -> None:
    """:class:`Unauthorized` unless the configured key (if any) was presented; ``what``
    names the call ("this route"), ``how`` says how to send the key."""
    if settings.api_key is None:
        return
    if presented is None:
        raise Unauthorized(f"{what} needs the API key: send {how}")
    if not secrets.compare_digest(presented.encode(), settings.api_key.get_secret_value().encode()):
        raise Unauthorized("the API key is wrong")


def check_management(settings: Settings, presented: str | None, what: str, how: str) -> None:
    """:class:`Forbidden` when management is off here, else :func:`check_api_key`."""
    refused = management_policy(settings)
    if refused is not None:
        raise Forbidden(refused)
    check_api_key(settings, presented, what, how)
