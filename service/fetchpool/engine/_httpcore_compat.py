"""The only module that reaches into httpx/httpcore internals.

httpx has no public way to resize a live pool or to list its connections
(encode/httpx discussions on pool stats; ``httpx.Limits`` is construction-only).
httpcore's ``AsyncConnectionPool`` re-reads ``_max_connections`` and
``_max_keepalive_connections`` each time it assigns requests to connections, and
exposes its connections through the public ``connections`` property whose items
have the public ``is_idle()``, ``is_closed()``, ``has_expired()``, ``info()`` and
``aclose()`` methods. What is private here: ``AsyncHTTPTransport._pool`` and the
three limit attributes. ``tests/unit/test_httpcore_compat.py`` pins the versions
this was checked against (httpx 0.28.1, httpcore 1.0.9).
"""

from __future__ import annotations

from dataclasses import dataclass

import httpcore
import httpx

CHECKED_VERSIONS = {"httpx": "0.28.1", "httpcore": "1.0.9"}


@dataclass(frozen=True, slots=True)
class ConnectionCounts:
    """Connections of one pool: ``open`` = ``idle`` + ``active`` (connecting counts as active)."""

    open: int
    idle: int
    active: int


def _pool(transport: httpx.AsyncHTTPTransport) -> httpcore.AsyncConnectionPool:
    pool = transport._pool
    assert isinstance(pool, httpcore.AsyncConnectionPool), type(pool)
    return pool


def apply_limits(
    transport: httpx.AsyncHTTPTransport, *, max_connections: int, max_keepalive_connections: int,
    keepalive_expiry: float,
) -> None:
    """Set the live pool's limits; httpcore reads them on its next assignment.

    ``keepalive_expiry`` (seconds) applies to connections opened from now on.
    """
    pool = _pool(transport)
    pool._max_connections = max_connections
    pool._max_keepalive_connections = min(max_keepalive_connections, max_connections)
    pool._keepalive_expiry = keepalive_expiry


def connections(transport: httpx.AsyncHTTPTransport) -> list[httpcore.AsyncConnectionInterface]:
    """The pool's connections (a copy), through httpcore's public ``connections`` property."""
    return list(_pool(transport).connections)


def count(transport: httpx.AsyncHTTPTransport) -> ConnectionCounts:
    """Open, idle and active connections right now."""
    idle = active = 0
    for connection in _pool(transport).connections:
        if connection.is_closed():
            continue
        if connection.is_idle():
            idle += 1
        else:
            active += 1
    return ConnectionCounts(open=idle + active, idle=idle, active=active)


def _inner(connection: httpcore.AsyncConnectionInterface) -> object | None:
    # AsyncHTTPConnection, AsyncTunnelHTTPConnection and AsyncSocks5Connection all keep
    # the HTTP/1.1 or HTTP/2 connection they made in `_connection` (None until connected).
    return getattr(connection, "_connection", None)


def connection_of(
    transport: httpx.AsyncHTTPTransport, network_stream: object
) -> httpcore.AsyncConnectionInterface | None:
    """The pool connection whose socket is ``network_stream`` (``response.extensions["network_stream"]``)."""
    for connection in _pool(transport).connections:
        if getattr(_inner(connection), "_network_stream", None) is network_stream:
            return connection
    return None


def stop_new_requests(connection: httpcore.AsyncConnectionInterface) -> None:
    """Make an HTTP/2 connection take no new streams; those in flight finish.

    httpcore marks a connection that ran out of stream ids this way
    (``AsyncHTTP2Connection._used_all_stream_ids``); ``is_available()`` then says
    False and the pool opens a new connection for new requests. HTTP/1.1
    connections carry one request at a time and are closed when idle instead.
    """
    inner = _inner(connection)
    if inner is not None and hasattr(inner, "_used_all_stream_ids"):
        inner._used_all_stream_ids = True


def peer_closed(connection: httpcore.AsyncConnectionInterface) -> bool:
    """Whether an idle connection's socket is readable, i.e. the peer closed it (or sent
    something unasked, which an idle connection should not get either).

    httpcore checks this for idle HTTP/1.1 connections (``has_expired``) but not for
    HTTP/2 ones, so a proxy or server that went away leaves a dead HTTP/2 connection
    that fails every request multiplexed onto it next.
    """
    stream = getattr(_inner(connection), "_network_stream", None)
    return stream is not None and bool(stream.get_extra_info("is_readable"))
