"""The ``httpcore`` transport: httpx's own ``AsyncHTTPTransport``, with fetchpool's connections and
request assignment under it (``engine/_httpcore``, which explains each fault it fixes).

Phases come from httpcore's ``trace`` request extension (``engine/phases.py``); the SSRF guard
is the pool's network backend (``guard.GuardedBackend``), so every TCP connect goes to an
address it checked.
"""

from __future__ import annotations

import ssl
import weakref
from collections.abc import Hashable

import httpcore
import httpx

from fetchpool.config import PoolLimits
from fetchpool.engine import _httpcore as compat
from fetchpool.engine.guard import GuardedBackend
from fetchpool.engine.transports.base import ConnectionCounts, PoolTransport, TransportConfig


class HttpcoreTransport(PoolTransport):
    """A pool on httpcore (see the module docstring)."""

    def __init__(self, config: TransportConfig) -> None:
        compat.verify()
        self._config = config
        self._limits = config.limits
        self._backend = GuardedBackend(config.guard) if config.guard is not None else None
        self._verified = self._make(config.ssl_context)
        # Requests that skip certificate checks get connections of their own, made on demand.
        self._insecure: httpx.AsyncHTTPTransport | None = None
        self._retired = 0
        # Per connection: when it was first seen (monotonic), for max_connection_age; weak, so
        # closed ones vanish. (max_requests_per_connection is counted by the connection itself.)
        self._seen: weakref.WeakKeyDictionary[httpcore.AsyncConnectionInterface, float] = weakref.WeakKeyDictionary()
        policy = config.policy
        self._hygiene = bool(policy.max_requests_per_connection or policy.max_connection_age)

    def _make(self, ssl_context: ssl.SSLContext) -> httpx.AsyncHTTPTransport:
        limits = self._limits
        return compat.make_transport(
            ssl_context=ssl_context,
            limits=httpx.Limits(max_connections=limits.max_connections,
                                max_keepalive_connections=limits.max_keepalive_connections,
                                keepalive_expiry=limits.keepalive_expiry),
            proxy=self._config.proxy_url,
            network_backend=self._backend,
            max_requests_per_connection=self._config.policy.max_requests_per_connection,
        )

    def for_request(self, insecure: bool) -> httpx.AsyncHTTPTransport:
        if not insecure:
            return self._verified
        if self._insecure is None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self._insecure = self._make(context)
        return self._insecure

    def _transports(self) -> list[httpx.AsyncHTTPTransport]:
        return [self._verified] if self._insecure is None else [self._verified, self._insecure]

    def _connections(self) -> list[httpcore.AsyncConnectionInterface]:
        return [c for t in self._transports() for c in compat.connections(t) if not c.is_closed()]

    def apply_limits(self, limits: PoolLimits) -> None:
        self._limits = limits
        for transport in self._transports():
            compat.apply_limits(
                transport,
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
            )

    def counts(self) -> ConnectionCounts:
        idle = sum(c.is_idle() for c in self._connections())
        return ConnectionCounts(open=sum(compat.open_sockets(t) for t in self._transports()), idle=idle)

    def open_connections(self) -> dict[Hashable, str]:
        return {c: "HTTP/2" if "HTTP/2" in c.info() else "HTTP/1.1" for c in self._connections()}

    @property
    def retired_total(self) -> int:
        return self._retired + sum(compat.retired_closed(t) for t in self._transports())

    def needs_release(self, response: httpx.Response) -> bool:
        # With connection hygiene, the connection of a closed response may be due to retire.
        return self._hygiene or not response.is_closed

    async def release(self, response: httpx.Response) -> None:
        # A retiring connection takes no new request, so none can slip in between these steps.
        await response.aclose()
        if not self._hygiene:
            return
        stream = response.extensions.get("network_stream")
        if stream is None:
            return
        connection = next((c for t in self._transports() if (c := compat.connection_of(t, stream)) is not None), None)
        if connection is not None and compat.retiring(connection) and connection.is_idle():
            self._retired += 1
            await connection.aclose()

    async def tend(self, now: float, max_connections: int) -> None:
        # httpcore closes expired idle connections only when a request comes; this does it anyway.
        max_age = self._config.policy.max_connection_age
        if max_age:
            for connection in self._connections():
                if now - self._seen.setdefault(connection, now) >= max_age:
                    compat.stop_new_requests(connection)
        for transport in self._transports():
            await compat.sweep(transport)
        connections = self._connections()
        idle = [c for c in connections if c.is_idle()]
        active = len(connections) - len(idle)
        keep = max(0, min(self._limits.max_keepalive_connections, max_connections - active))
        doomed = [c for c in idle if c.has_expired() or compat.retiring(c) or compat.peer_closed(c)]
        doomed += [c for c in idle if c not in doomed][keep:]
        for connection in doomed:
            self._retired += 1
            await connection.aclose()

    async def aclose(self) -> None:
        for transport in self._transports():
            await transport.aclose()
