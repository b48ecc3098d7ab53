"""The only module that reaches into httpx/httpcore internals.

httpx has no public way to resize a live pool or to list its connections
(encode/httpx discussions on pool stats; ``httpx.Limits`` is construction-only).
httpcore's ``AsyncConnectionPool`` re-reads ``_max_connections`` and
``_max_keepalive_connections`` each time it assigns requests to connections, and
exposes its connections through the public ``connections`` property whose items
have the public ``is_idle()``, ``is_closed()``, ``has_expired()``, ``info()`` and
``aclose()`` methods. What is private here: ``AsyncHTTPTransport._pool`` and the
three limit attributes, the connections' ``_connection``/``_network_stream``, and
httpcore's HTTP/2 configuration. ``tests/unit/test_contract.py`` pins the versions
this was checked against (httpx 0.28.1, httpcore 1.0.9).
"""

from __future__ import annotations

import socket
from typing import Any

import h2.config
import httpcore
import httpx

CHECKED_VERSIONS = {"httpx": "0.28.1", "httpcore": "1.0.9"}


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
    """Whether the peer closed an idle connection's socket (EOF or reset seen by a peek).

    httpcore notices this for idle HTTP/1.1 connections (``has_expired``) but not for
    HTTP/2 ones, so a proxy or server that went away leaves a dead HTTP/2 connection
    that fails every request multiplexed onto it next. Readable data alone is not a
    close (an HTTP/2 peer may have sent SETTINGS, PING or WINDOW_UPDATE), so this peeks.
    """
    stream = getattr(_inner(connection), "_network_stream", None)
    transport_socket = stream.get_extra_info("socket") if stream is not None else None
    if transport_socket is None:
        return False
    # asyncio hands out a TransportSocket without recv(); peek through a duplicate descriptor.
    try:
        with socket.fromfd(transport_socket.fileno(), transport_socket.family, transport_socket.type) as sock:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def install_network_backend(transport: httpx.AsyncHTTPTransport, backend: httpcore.AsyncNetworkBackend) -> None:
    """Make the pool open its TCP connections through ``backend`` (the SSRF guard).

    ``httpcore.AsyncConnectionPool`` takes a ``network_backend`` argument, but
    ``httpx.AsyncHTTPTransport`` does not pass one through; the pool hands
    ``_network_backend`` to every connection it creates.
    """
    _pool(transport)._network_backend = backend



def validate_http2_responses() -> None:
    """Make h2 check the response header blocks it receives (RFC 9113 §8.3.2: a response
    without ``:status``, with upper-case or connection-specific fields, is malformed).

    httpcore turns this off (``AsyncHTTP2Connection.CONFIG``, a class attribute read when a
    connection is made) and then reports a response with no ``:status`` as a 200. Go's
    HTTP/2 client rejects such responses too. Process-wide; idempotent.
    """
    from httpcore._async.http2 import AsyncHTTP2Connection

    AsyncHTTP2Connection.CONFIG = h2.config.H2Configuration(validate_inbound_headers=True)


class _LinearAssignment:
    """``AsyncConnectionPool._assign_requests_to_connections`` in linear time, counting idle
    connections as idle, and checking expiry only on the connection about to be reused.

    httpcore 1.0.9 builds a list of every connection for every connection it looks at
    (``len([connection.is_idle() for connection in self._connections])``): quadratic in the
    pool size, and it counts all connections instead of idle ones, so idle connections
    are closed as soon as the pool holds more than ``max_keepalive_connections``
    (encode/httpcore PRs #924 and #1035). It also polls the socket of every idle connection
    (``has_expired``) on every request. Here a pass looks at each connection once and polls
    only the one it hands out; the engine's per-second upkeep closes the other expired ones.
    The assignment rules are httpcore's: reuse an available connection, else open one
    under ``max_connections``, else replace an idle one.
    """

    _connections: list[httpcore.AsyncConnectionInterface]
    _requests: list[Any]
    _max_connections: int
    _max_keepalive_connections: int

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        closing: list[httpcore.AsyncConnectionInterface] = []
        kept: list[httpcore.AsyncConnectionInterface] = []
        idle = 0
        for connection in self._connections:
            if connection.is_closed():
                continue
            if connection.is_idle():
                if idle >= self._max_keepalive_connections:
                    closing.append(connection)
                    continue
                idle += 1
            kept.append(connection)
        self._connections = kept

        for pool_request in [request for request in self._requests if request.is_queued()]:
            origin = pool_request.request.url.origin
            chosen: httpcore.AsyncConnectionInterface | None = None
            for candidate in self._connections:
                if candidate.can_handle_request(origin) and candidate.is_available():
                    if candidate.is_idle() and candidate.has_expired():
                        closing.append(candidate)  # the server closed it, or keep-alive expired
                        continue
                    chosen = candidate
                    break
            self._connections = [c for c in self._connections if c not in closing]
            if chosen is None and len(self._connections) >= self._max_connections:
                replaced = next((c for c in self._connections if c.is_idle()), None)
                if replaced is None:
                    continue  # stays queued until a connection frees up
                self._connections.remove(replaced)
                closing.append(replaced)
            if chosen is None:
                chosen = self.create_connection(origin)  # type: ignore[attr-defined]
                self._connections.append(chosen)
            pool_request.assign_to_connection(chosen)
        return closing


def linear_pool_assignment(transport: httpx.AsyncHTTPTransport) -> None:
    """Give the transport's pool the linear assignment above (for direct, HTTP proxy and
    SOCKS pools alike, by a subclass of the pool's own class)."""
    pool = transport._pool
    cls = type(pool)
    if not issubclass(cls, _LinearAssignment):
        pool.__class__ = type(f"Linear{cls.__name__}", (_LinearAssignment, cls), {})
