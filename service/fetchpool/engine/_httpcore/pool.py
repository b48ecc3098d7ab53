"""httpcore's connection pool with fetchpool's connections and a request assignment that
keeps the pool's count true.

:class:`PoolMixin` is put in front of the class of the pool an ``httpx.AsyncHTTPTransport``
made (direct, HTTP proxy or SOCKS5), so httpx's own transport keeps working unchanged:

- ``create_connection`` makes :mod:`~fetchpool.engine._httpcore.connections`' connections
  (open once, fail together, no socket left behind), with the pool's own settings;
- ``_assign_requests_to_connections`` runs in linear time and counts idle connections as
  idle (httpcore 1.0.9 builds a list of every connection for every connection it looks at, and
  counts all of them as idle: encode/httpcore PRs #924, #1035), and it closes *orphans*: a
  connection that is neither idle nor closed while no request is assigned to it. Such a
  connection has lost its request to a cancellation at an unlucky moment (a stream whose
  clean-up was cut short, an opening abandoned before it began); nothing would ever use or
  close it, and it would hold a place under ``max_connections`` for good;
- it gives a connection no more requests than it can carry at once, counting those assigned
  to it and not yet finished (Go's transport counts its streams and reservations the same way):
  one for HTTP/1.1, and for HTTP/2 the server's SETTINGS_MAX_CONCURRENT_STREAMS (at most
  ``h2.MAX_STREAMS``; before a connection's SETTINGS arrive, the last limit its origin's server
  gave, else ``h2.MAX_STREAMS``). The next request gets another connection, up to
  ``max_connections``, instead of queueing behind a full one (Go's
  ``StrictMaxConcurrentStreams = false``); beyond that it waits here, in order. httpcore 1.0.9
  sends every request to an HTTP/2 connection that is not closing, where it waits for a stream.
  Over its life a connection is given no more requests than its request limit
  (``max_requests_per_connection``, or the one learned from its origin's GOAWAYs: ``limits.py``),
  so none of ours is on its way when a server ends the connection at that limit;
- a response's release (``_ReleasedWhole``) and ``_close_connections`` cannot be stopped
  half-way by a cancellation (see ``shield.py``), so a connection removed from the pool always
  has its socket closed; until it is, the connection is in the pool's ``closing`` set, and
  counted as open.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from typing import Any

import httpcore
from httpcore import AsyncConnectionInterface, Origin
from httpcore._async.connection_pool import PoolByteStream
from httpcore._async.http11 import AsyncHTTP11Connection, HTTPConnectionState

from fetchpool.engine._httpcore import connections as conn
from fetchpool.engine._httpcore.h2 import MAX_STREAMS, GracefulHTTP2Connection
from fetchpool.engine._httpcore.limits import RequestLimits, remember
from fetchpool.engine._httpcore.shield import shielded


class PoolMixin:
    """Mixed in front of ``httpcore.AsyncConnectionPool`` and its proxy subclasses."""

    _connections: list[AsyncConnectionInterface]
    _requests: list[Any]
    _max_connections: int
    _max_keepalive_connections: int
    _keepalive_expiry: float | None
    _http2: bool
    _ssl_context: Any
    _network_backend: httpcore.AsyncNetworkBackend
    _protocols: dict[conn.OriginKey, bool]
    _stream_limits: dict[conn.OriginKey, int]  # the last SETTINGS_MAX_CONCURRENT_STREAMS per origin
    _request_limits: RequestLimits  # requests per connection its origins' servers allow
    retired_closed: int  # public: connections closed here the engine counts as retired (see below)
    closing: set[AsyncConnectionInterface]  # public: out of the list, their sockets still closing
    max_requests_per_connection: int  # 0: no limit
    # AsyncHTTPProxy's and AsyncSOCKSProxy's settings (read only on those pools).
    _proxy_url: httpcore.URL
    _proxy_headers: list[tuple[bytes, bytes]]
    _proxy_ssl_context: Any
    _proxy_auth: tuple[bytes, bytes] | None

    def create_connection(self, origin: Origin) -> AsyncConnectionInterface:
        alpn = ["http/1.1", "h2"] if self._http2 else ["http/1.1"]
        common = {"backend": self._network_backend, "ssl_context": self._ssl_context, "alpn": alpn}
        if isinstance(self, httpcore.AsyncHTTPProxy):
            proxy = self._proxy_url.origin
            if origin.scheme == b"http":
                opener = functools.partial(conn.open_direct, origin=proxy, backend=self._network_backend,
                                           ssl_context=self._proxy_ssl_context, alpn=["http/1.1"])
                return conn.ForwardConnection(
                    self._pool_connection(proxy, opener, http2=False), proxy_origin=proxy,
                    proxy_headers=self._proxy_headers, remote_origin=origin, keepalive_expiry=self._keepalive_expiry,
                )
            opener = functools.partial(conn.open_tunnel, proxy=proxy, proxy_headers=self._proxy_headers,
                                       proxy_ssl_context=self._proxy_ssl_context, target=origin, **common)
        elif isinstance(self, httpcore.AsyncSOCKSProxy):
            opener = functools.partial(conn.open_socks5, proxy=self._proxy_url.origin, auth=self._proxy_auth,
                                       target=origin, **common)
        else:
            opener = functools.partial(conn.open_direct, origin=origin, **common)
        return self._pool_connection(origin, opener, http2=self._http2)

    def _pool_connection(self, origin: Origin, opener: Any, *, http2: bool) -> conn.PoolConnection:
        return conn.PoolConnection(origin, opener, http2=http2, keepalive_expiry=self._keepalive_expiry,
                                   protocols=self._protocols, max_requests=self.max_requests_per_connection,
                                   learned=self._request_limits)

    def _assign_requests_to_connections(self) -> list[AsyncConnectionInterface]:
        """httpcore's rules (reuse an available connection, else open one under
        ``max_connections``, else replace an idle one), each connection looked at once and
        given at most what it can carry (see the module docstring); only the connection about
        to be reused is polled for expiry (the engine's upkeep closes the other expired ones),
        and orphans are closed."""
        load = collections.Counter(id(request.connection) for request in self._requests
                                   if request.connection is not None)
        closing: list[AsyncConnectionInterface] = []
        kept: list[AsyncConnectionInterface] = []
        idle = 0
        for connection in self._connections:
            if connection.is_closed():
                continue
            if connection.is_idle():
                if idle >= self._max_keepalive_connections:
                    self._close_idle(connection, closing)
                    continue
                idle += 1
            elif id(connection) not in load:
                closing.append(connection)  # an orphan
                self.retired_closed += 1
                continue
            kept.append(connection)
        self._connections = kept
        queued = [request for request in self._requests if request.is_queued()]
        if not queued:
            return closing

        # Connections that can take more requests now -> how many more (in the pool's order).
        room = {c: spare for c in kept if c.is_available() and (spare := self._room(c, load[id(c)])) > 0}
        blocked: set[conn.OriginKey] = set()  # origins no connection can take more of in this pass
        for pool_request in queued:
            origin = pool_request.request.url.origin
            key = (origin.scheme, origin.host, origin.port)
            if key in blocked:
                continue
            chosen: AsyncConnectionInterface | None = None
            for candidate in [c for c in room if c.can_handle_request(origin)]:
                if candidate.is_idle() and candidate.has_expired():
                    del room[candidate]  # the server closed it, or keep-alive expired
                    self._connections.remove(candidate)
                    closing.append(candidate)
                    continue
                chosen = candidate
                break
            if chosen is None and len(self._connections) >= self._max_connections:
                replaced = next((c for c in self._connections if c.is_idle() and not load[id(c)]), None)
                if replaced is None:  # stays queued until a connection frees up
                    if not room:
                        break  # and so do all the others
                    blocked.add(key)
                    continue
                room.pop(replaced, None)
                self._connections.remove(replaced)
                self._close_idle(replaced, closing)
            if chosen is None:
                chosen = self.create_connection(origin)
                self._connections.append(chosen)
                room[chosen] = max(1, self._room(chosen, 0)) if chosen.is_available() else 1
            load[id(chosen)] += 1
            room[chosen] -= 1
            if not room[chosen]:
                del room[chosen]
            pool_request.assign_to_connection(chosen)
            if isinstance(chosen, conn.PoolConnection):
                chosen.promise()
        return closing

    def _close_idle(self, connection: AsyncConnectionInterface, closing: list[AsyncConnectionInterface]) -> None:
        """Close idle ``connection``; one at its request limit counts as retired (it was, and
        the engine's release looks for it in the pool only after this may have run)."""
        closing.append(connection)
        if isinstance(connection, conn.PoolConnection) and connection.retiring:
            self.retired_closed += 1

    def _room(self, connection: AsyncConnectionInterface, load: int) -> int:
        """More requests ``connection``, carrying ``load``, can take now (see the module docstring),
        within what its request limit leaves (``PoolConnection.unpromised``)."""
        if not isinstance(connection, conn.PoolConnection):
            return 1 - load  # plain HTTP forwarded through a proxy: HTTP/1.1
        room = self._capacity(connection) - load
        unpromised = connection.unpromised()
        return room if unpromised is None else min(room, unpromised)

    def _capacity(self, connection: conn.PoolConnection) -> int:
        """Requests ``connection`` can carry at once."""
        inner = connection.connection
        key: conn.OriginKey = connection._key  # this package's own class
        if isinstance(inner, GracefulHTTP2Connection):
            streams = inner.stream_capacity
            if streams is not None:
                if self._stream_limits.get(key) != streams:
                    remember(self._stream_limits, key, streams)
                return streams
        elif inner is not None:
            return 1  # HTTP/1.1
        # Still opening (an https origin that may answer HTTP/2), or HTTP/2 before the server's SETTINGS.
        return self._stream_limits.get(key, MAX_STREAMS)

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        response: httpcore.Response = await super().handle_async_request(request)  # type: ignore[misc]
        stream = response.stream
        assert isinstance(stream, PoolByteStream)
        response.stream = _ReleasedWhole(stream._stream, stream._pool_request, stream._pool)
        return response

    async def _close_connections(self, closing: list[AsyncConnectionInterface]) -> None:
        if closing:
            # Out of the pool's list already, and closed one after another: counted until closed.
            self.closing.update(closing)
            await shielded(self._close_counted(closing))

    async def _close_counted(self, closing: list[AsyncConnectionInterface]) -> None:
        try:
            await super()._close_connections(closing)  # type: ignore[misc]
        finally:
            self.closing.difference_update(closing)


class _ReleasedWhole(PoolByteStream):
    """httpcore's response stream, whose release a cancellation cannot leave half-done.

    Its ``aclose`` gives the connection back (HTTP/1.1: idle again, or closed when the body was
    not read to its end) and takes the request out of the pool, guarded by an anyio shield that
    asyncio's ``Task.cancel()`` passes (``shield.py``): the HTTP/1.1 connection's state lock is a
    checkpoint. A cancellation landing there (a batch cancelled as its bodies end: a caller
    cancelling a FetchMany after its first results) left the connection ACTIVE and its request in
    the pool, for good: 1-8 more such connections after each of four cancelled calls
    (``test_batches_cancelled_as_their_bodies_end_leave_no_connection_active``). What the cut
    left is finished in a task of its own. Not every close runs in such a task: that cost the
    service 7 % more CPU per fetch (``bench.profile_service``, 5 rounds, median ratio 1.07; this
    way 1.03-1.05 against no fix, 12 rounds, within the machine's noise of +-10 % a round)."""

    async def aclose(self) -> None:
        if self._closed:
            return
        try:
            await super().aclose()
        except asyncio.CancelledError:
            await shielded(self._finish())
            raise

    async def _finish(self) -> None:
        """Finish a release a cancellation cut short: an HTTP/1.1 connection still ACTIVE is
        released again (HTTP/2 streams close shielded already, ``h2.py``); the request, if still
        in the pool, leaves it, and the connections that frees are assigned or closed."""
        connection = getattr(self._stream, "_connection", None)
        if isinstance(connection, AsyncHTTP11Connection) and connection._state is HTTPConnectionState.ACTIVE:
            await connection._response_closed()
        pool = self._pool
        with pool._optional_thread_lock:
            if self._pool_request not in pool._requests:
                return
            pool._requests.remove(self._pool_request)
            closing = pool._assign_requests_to_connections()
        await pool._close_connections(closing)


def install(pool: httpcore.AsyncConnectionPool, max_requests_per_connection: int) -> None:
    """Put :class:`PoolMixin` in front of ``pool``'s class (direct, HTTP proxy or SOCKS5 pool);
    its connections take ``max_requests_per_connection`` requests at most (0: no limit)."""
    cls = type(pool)
    if not issubclass(cls, PoolMixin):
        pool.__class__ = type(f"Fetchpool{cls.__name__}", (PoolMixin, cls), {})
    pool._protocols = {}  # type: ignore[attr-defined]
    pool._stream_limits = {}  # type: ignore[attr-defined]
    pool._request_limits = RequestLimits()  # type: ignore[attr-defined]
    pool.retired_closed = 0  # type: ignore[attr-defined]
    pool.closing = set()  # type: ignore[attr-defined]
    pool.max_requests_per_connection = max_requests_per_connection  # type: ignore[attr-defined]
