"""The start-up check: the internals this package relies on are the ones it was written against.

``engine/_httpcore`` subclasses httpcore's pool and HTTP/2 connection, replaces some of their
methods and reads private attributes. Rather than ``getattr`` defaults that would quietly turn
a fix (or the SSRF guard, installed as the pool's network backend) into a no-op after an
upgrade, :func:`verify` compares the source of every module it builds on with the source it
was checked against, and looks for every attribute it reads. Any difference stops the engine
with one :class:`~fetchpool.errors.ConfigError` naming what changed; the fix is to re-read
those modules and update this package (then the digests below: ``python -m
fetchpool.engine._httpcore.checks`` prints them).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import ssl
from typing import Any

import h2.connection
import httpcore
import httpx

from fetchpool.errors import ConfigError

#: Source digests (sha256, 16 hex digits) of what the package builds on: httpcore 1.0.9,
#: h2 4.3-4.4's connection state machine and GOAWAY handling, httpx 0.28.1's transport constructor.
SOURCES = {
    "httpcore._async.http2": "6b35f57dc9ad5da2",
    "httpcore._async.connection_pool": "0ce210dacd9909ff",
    "httpcore._async.http_proxy": "db3564ae5bfe0ecf",
    "httpcore._async.socks_proxy": "94b2a02e58203df8",
    "httpcore._async.http11": "faa33d6d5ecf8d24",
    "httpcore._backends.anyio": "c7c3e01215d10bc6",
    "h2.connection:H2ConnectionStateMachine": "b1e149376a19400c",
    "h2.connection:H2Connection._receive_goaway_frame": "adb9adfae94088c4",
    "httpx._transports.default:AsyncHTTPTransport.__init__": "433c33239d86ec87",
}
#: The same for the httpx methods ``engine._client.PoolClient`` replaces (``_send_single_request``
#: with the ``request_context`` it keeps, ``_send_handling_redirects``), the one that calls them
#: and the redirect builder it calls (and whose "no URL" error it expects): checked by
#: :func:`verify_client`, whatever the transport (the client is the same on every one).
CLIENT_SOURCES = {
    "httpx._client:AsyncClient._send_single_request": "339c8a224990002f",
    "httpx._client:AsyncClient._send_handling_redirects": "88dba22b42995950",
    "httpx._client:AsyncClient._send_handling_auth": "73be9fe146881fca",
    "httpx._client:AsyncClient._build_redirect_request": "94360dbc86ace7c4",
    "httpx._client:AsyncClient._redirect_url": "77347a71d28837ea",
    "httpx._models:request_context": "e8b21fd7b402c1aa",
}

_POOL_ATTRIBUTES = ("_connections", "_requests", "_max_connections", "_max_keepalive_connections",
                    "_keepalive_expiry", "_http2", "_ssl_context", "_network_backend")
_PROXY_ATTRIBUTES = {"http": ("_proxy_url", "_proxy_headers", "_proxy_ssl_context"),
                     "socks5": ("_proxy_url", "_proxy_auth")}
_H2_ATTRIBUTES = ("_h2_state", "_events", "_connection_terminated", "_state", "_request_count", "_expire_at",
                  "_init_lock", "_read_lock", "_write_lock", "_sent_connection_init", "_used_all_stream_ids",
                  "_write_exception", "_connection_error", "_network_stream", "_keepalive_expiry", "_origin")


def _resolve(path: str) -> Any:
    module, _, attribute = path.partition(":")
    target: Any = importlib.import_module(module)
    for part in filter(None, attribute.split(".")):
        target = getattr(target, part)
    return target


def digest(path: str) -> str:
    """The source digest of ``path`` (``module`` or ``module:qualified.name``)."""
    return hashlib.sha256(inspect.getsource(_resolve(path)).encode()).hexdigest()[:16]


class _Stream(httpcore.AsyncNetworkStream):
    """A stream that is never used: it lets the check build an HTTP/2 connection object."""


def _missing(obj: object, names: tuple[str, ...], label: str) -> list[str]:
    return [f"{label}.{name} is gone" for name in names if not hasattr(obj, name)]


def _attribute_problems() -> list[str]:
    from fetchpool.engine._httpcore.h2 import GracefulHTTP2Connection

    problems: list[str] = []
    context = ssl.create_default_context()
    for scheme in ("", "http", "socks5"):
        proxy = httpx.Proxy(f"{scheme}://127.0.0.1:9") if scheme else None
        transport = httpx.AsyncHTTPTransport(verify=context, http2=True, proxy=proxy)
        pool = getattr(transport, "_pool", None)
        if not isinstance(pool, httpcore.AsyncConnectionPool):
            return [f"httpx.AsyncHTTPTransport._pool is {type(pool).__name__}, not an httpcore pool"]
        problems += _missing(pool, _POOL_ATTRIBUTES + _PROXY_ATTRIBUTES.get(scheme, ()), type(pool).__name__)
    request = httpcore._async.connection_pool.AsyncPoolRequest(httpcore.Request("GET", "https://x/"))
    problems += _missing(request, ("request", "connection", "is_queued", "assign_to_connection"), "AsyncPoolRequest")
    origin = httpcore.URL("https://x/").origin
    problems += _missing(GracefulHTTP2Connection(origin, _Stream()), _H2_ATTRIBUTES, "AsyncHTTP2Connection")
    connection = h2.connection.H2Connection()
    problems += _missing(connection, ("state_machine", "_data_to_send", "streams"), "h2.H2Connection")
    return problems


@functools.cache
def verify() -> None:
    """Raise ConfigError unless the internals are the ones this package was written against
    (checked once per process)."""
    problems = [f"{path} differs from the checked source" for path, want in SOURCES.items() if digest(path) != want]
    problems += _attribute_problems()
    if problems:
        raise ConfigError(
            f"httpx {httpx.__version__} / httpcore {httpcore.__version__} / h2 differ from the versions "
            "fetchpool.engine._httpcore was written against (httpx 0.28.1, httpcore 1.0.9, h2 4.x): "
            + "; ".join(problems) + ". Install the locked versions (make install), or re-read those modules and "
            "update fetchpool/engine/_httpcore."
        )


@functools.cache
def verify_client() -> None:
    """Raise ConfigError unless the httpx client methods ``engine._client.PoolClient`` replaces or
    keeps are those of httpx 0.28.1 (checked once per process)."""
    changed = [path for path, want in CLIENT_SOURCES.items() if digest(path) != want]
    if changed:
        raise ConfigError(
            f"httpx {httpx.__version__} differs from httpx 0.28.1, which fetchpool.engine._client was written "
            f"against: {', '.join(changed)} changed. Install the locked versions (make install), or re-read those "
            "methods and update fetchpool/engine/_client.py."
        )


if __name__ == "__main__":
    for name in (*SOURCES, *CLIENT_SOURCES):
        print(f'    "{name}": "{digest(name)}",')
