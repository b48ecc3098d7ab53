"""The only package that reaches into httpx's transport's, httpcore's and h2's internals (httpx's
client's: ``engine/_client.py``, checked here too).

httpx has no public way to resize a live pool or list its connections (``httpx.Limits`` is
construction-only), and httpcore 1.0.9 (its newest release) loses results and pool places on
a graceful HTTP/2 close and on cancellation (see ``h2.py``, ``connections.py``, ``pool.py``).
fetchpool keeps httpx's client and transport and replaces, under them, httpcore's connections
and its request assignment. What is private, all checked at start-up by :func:`verify`
(``checks.py``): ``AsyncHTTPTransport._pool``, the pool's limit and list attributes and its
assignment and close hooks, the proxy pools' settings, the HTTP/2 connection's internals
(its overridden methods must have the source they were written against), and h2's
connection state machine. A release that changes any of them stops the engine from starting,
with a message saying what changed, instead of silently changing its behaviour.
"""

from __future__ import annotations

import socket
import ssl

import httpcore
import httpx

from fetchpool.engine._httpcore import pool as _pool_mixin
from fetchpool.engine._httpcore.checks import verify
from fetchpool.engine._httpcore.connections import ForwardConnection, OpenFailed, PoolConnection
from fetchpool.engine._httpcore.h2_support import stream_info

__all__ = [
    "OpenFailed",
    "apply_limits",
    "connection_of",
    "connections",
    "make_transport",
    "open_sockets",
    "peer_closed",
    "retired_closed",
    "retiring",
    "stop_new_requests",
    "stream_info",
    "sweep",
    "verify",
]


def make_transport(*, ssl_context: ssl.SSLContext, limits: httpx.Limits, proxy: str | None,
                   network_backend: httpcore.AsyncNetworkBackend | None, max_requests_per_connection: int = 0
                   ) -> httpx.AsyncHTTPTransport:
    """An HTTP/2-capable ``httpx.AsyncHTTPTransport`` (direct, or through one HTTP or SOCKS5
    proxy) whose pool uses fetchpool's connections; ``network_backend`` opens its TCP
    connections (the SSRF guard), httpcore's own when None; each connection takes
    ``max_requests_per_connection`` requests at most (0: no limit)."""
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, http2=True, limits=limits,
                                         proxy=httpx.Proxy(proxy) if proxy else None, retries=0)
    pool = _pool(transport)
    _pool_mixin.install(pool, max_requests_per_connection)
    if network_backend is not None:
        pool._network_backend = network_backend
    return transport


def _pool(transport: httpx.AsyncHTTPTransport) -> httpcore.AsyncConnectionPool:
    pool = transport._pool
    assert isinstance(pool, httpcore.AsyncConnectionPool), type(pool)
    return pool


def apply_limits(transport: httpx.AsyncHTTPTransport, *, max_connections: int, max_keepalive_connections: int,
                 keepalive_expiry: float) -> None:
    """Set the live pool's limits; the pool reads them on its next assignment.

    ``keepalive_expiry`` (seconds) applies to connections opened from now on.
    """
    pool = _pool(transport)
    pool._max_connections = max_connections
    pool._max_keepalive_connections = min(max_keepalive_connections, max_connections)
    pool._keepalive_expiry = keepalive_expiry


def connections(transport: httpx.AsyncHTTPTransport) -> list[httpcore.AsyncConnectionInterface]:
    """The pool's connections (a copy), through httpcore's public ``connections`` property."""
    return _pool(transport).connections


def open_sockets(transport: httpx.AsyncHTTPTransport) -> int:
    """The pool's connections whose socket is open, opening or closing: those in its list and
    those it took out of it and is closing (``PoolConnection.socket_open``)."""
    pool = _pool(transport)
    return sum(owner.socket_open if (owner := _socket_owner(c)) is not None else not c.is_closed()
               for c in [*pool.connections, *pool.closing])  # type: ignore[attr-defined]


def retired_closed(transport: httpx.AsyncHTTPTransport) -> int:
    """Connections the pool's assignment closed so far that count as retired: orphans, and idle
    ones at their request limit (see ``pool.py``)."""
    return int(_pool(transport).retired_closed)  # type: ignore[attr-defined]


async def sweep(transport: httpx.AsyncHTTPTransport) -> None:
    """Run the pool's request assignment once, outside any request: it closes orphans and
    surplus idle connections now rather than when the next request comes (see ``pool.py``)."""
    pool = _pool(transport)
    await pool._close_connections(pool._assign_requests_to_connections())


def _socket_owner(connection: httpcore.AsyncConnectionInterface) -> PoolConnection | None:
    if isinstance(connection, ForwardConnection):
        return connection.inner
    return connection if isinstance(connection, PoolConnection) else None


def connection_of(transport: httpx.AsyncHTTPTransport, network_stream: object
                  ) -> httpcore.AsyncConnectionInterface | None:
    """The pool connection whose socket is ``network_stream`` (``response.extensions["network_stream"]``)."""
    for connection in _pool(transport).connections:
        owner = _socket_owner(connection)
        if owner is not None and owner.network_stream is network_stream:
            return connection
    return None


def stop_new_requests(connection: httpcore.AsyncConnectionInterface) -> None:
    """Make ``connection`` take no new request; those in flight finish (HTTP/1.1 or HTTP/2)."""
    owner = _socket_owner(connection)
    if owner is not None:
        owner.retire()


def retiring(connection: httpcore.AsyncConnectionInterface) -> bool:
    """Whether ``connection`` takes no new request (retired, or at its max requests)."""
    owner = _socket_owner(connection)
    return owner is not None and owner.retiring


def peer_closed(connection: httpcore.AsyncConnectionInterface) -> bool:
    """Whether the peer closed an idle connection's socket (EOF or reset seen by a peek).

    httpcore notices this for idle HTTP/1.1 connections (``has_expired``) but not for HTTP/2
    ones, so a proxy or server that went away leaves a dead HTTP/2 connection that fails every
    request multiplexed onto it next. Readable data alone is not a close (an HTTP/2 peer may
    have sent SETTINGS, PING or WINDOW_UPDATE), so this peeks.
    """
    owner = _socket_owner(connection)
    stream = owner.network_stream if owner is not None else None
    transport_socket = stream_info(stream, "socket")
    if transport_socket is None:
        return False
    # asyncio hands out a TransportSocket without recv(); peek through a duplicate descriptor.
    try:
        with socket.fromfd(transport_socket.fileno(), transport_socket.family, transport_socket.type) as sock:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):  # closed meanwhile (uvloop's socket says "negative file descriptor")
        return True
