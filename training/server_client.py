"""Ask a running FoldServe server to serve a version the training side just exported.

``POST {url}/v2/repository/models/{name}/load`` makes every worker process of the
server rescan the model's directory; it answers 200 once all of them serve the
same versions, with ``{"name", "versions": [{"version", "state", "reason"}], "workers"}``
(``docs/service.md``). Standard library HTTP and JSON only: the training side
needs no HTTP client package for one request, and imports nothing of the service
beyond the repository contract.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

LOAD_TIMEOUT_S = 120.0  # the server answers once every worker has loaded (or given up)


class LoadError(RuntimeError):
    """The server could not be reached, refused the load, or does not serve the version."""


@dataclass(frozen=True)
class ServedModel:
    """What every worker process serves after a load."""

    name: str
    version: int  # the highest READY version: what unversioned requests get
    ready: list[int]  # every READY version, ascending
    workers: int


def _reason(body: bytes) -> str:
    """The ``error`` of a FoldServe error body, else the body as text."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    return str(error) if error else body.decode(errors="replace").strip() or "(empty body)"


def _call(
    url: str, method: str, path: str, headers: dict[str, str], timeout_s: float
) -> tuple[int, bytes]:
    """``(status, body)`` of one request to the server at ``url``; raises :class:`LoadError`
    when it cannot be reached."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise LoadError(f"the server URL must start with http:// or https://, got {url!r}")
    data = b"" if method == "POST" else None
    request = urllib.request.Request(
        f"{url.rstrip('/')}{path}", data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (OSError, http.client.HTTPException) as err:  # URLError, refused, timed out
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        if isinstance(reason, TimeoutError):
            raise LoadError(f"{url} did not answer within {timeout_s:g} s") from err
        raise LoadError(f"cannot reach {url}: {reason}") from err


def check_live(url: str, timeout_s: float = 10.0) -> None:
    """Raise :class:`LoadError` unless the server at ``url`` answers its liveness route:
    checked before a long training run, not only after it."""
    status, body = _call(url, "GET", "/v2/health/live", {}, timeout_s)
    if status != 200:
        raise LoadError(f"{url} is not a live FoldServe server (HTTP {status}): {_reason(body)}")


def load_version(
    url: str,
    name: str,
    version: int,
    api_key: str | None = None,
    timeout_s: float = LOAD_TIMEOUT_S,
) -> ServedModel:
    """Have the server at ``url`` load ``name`` and check that it serves ``version``.

    ``api_key`` goes as ``Authorization: Bearer``. Raises :class:`LoadError` with
    the server's own reason when it answers anything but 200, when ``version`` is
    not READY afterwards, or when it cannot be reached.
    """
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    path = f"/v2/repository/models/{urllib.parse.quote(name)}/load"
    status, body = _call(url, "POST", path, headers, timeout_s)
    if status != 200:
        raise LoadError(f"{url} refused to load {name} (HTTP {status}): {_reason(body)}")
    try:
        result = json.loads(body)
        states = {
            str(v["version"]): (str(v["state"]), str(v.get("reason", "")))
            for v in result["versions"]
            if v.get("version") is not None
        }
        workers = int(result["workers"])
    except (ValueError, TypeError, KeyError) as err:
        raise LoadError(f"{url} answered the load of {name} with an unknown body: {err}") from err
    ready = sorted(int(v) for v, (state, _) in states.items() if state == "READY")
    if version not in ready:
        found = states.get(str(version))
        why = f"{found[0]}: {found[1]}" if found is not None else "not in its index"
        raise LoadError(f"{url} loaded {name} but does not serve version {version} ({why})")
    return ServedModel(name, ready[-1], ready, workers)
