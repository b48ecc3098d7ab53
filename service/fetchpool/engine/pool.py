"""One connection pool: an httpx transport (direct or through one proxy), its
admission limiter, live limits, connection hygiene, proxy health and public stats."""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
import weakref
from dataclasses import dataclass

import httpcore
import httpx

from fetchpool.config import PoolLimits, PoolPolicy
from fetchpool.engine import _httpcore_compat as compat
from fetchpool.engine.admission import Admission
from fetchpool.engine.phases import PoolCounters
from fetchpool.engine.proxies import ProxyHealth
from fetchpool.engine.sizing import DynamicLimit

logger = logging.getLogger(__name__)

#: Pool-acquire waits kept for percentiles (the most recent ones).
WAIT_SAMPLES = 2048
#: Weight of a new sample in the exponentially weighted means.
EWMA_WEIGHT = 0.05


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """Stats of one pool at one moment (``fetchpool.v1.PoolStats``); times in seconds.

    ``ejected_until`` is a wall-clock epoch time (0 when not ejected).
    """

    pool: str
    limits: PoolLimits
    connections_open: int
    connections_idle: int
    connections_active: int
    http2_streams: int
    requests_active: int
    requests_waiting: int
    connections_created_total: int
    requests_total: int
    reuse_ratio: float
    acquire_wait_p50: float
    acquire_wait_p90: float
    acquire_wait_p99: float
    pool_timeouts_total: int
    working_limit: int
    latency_mean: float
    processing_mean: float
    concurrency_mean: float
    ejected: bool
    ejected_until: float
    consecutive_failures: int
    retries_total: int
    connections_retired_total: int


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]


class Pool:
    """A pool named ``name`` ("direct" or a proxy URL without credentials).

    ``proxy_url`` may carry credentials; they go to httpx only.
    """

    def __init__(self, name: str, limits: PoolLimits, policy: PoolPolicy, ssl_context: ssl.SSLContext,
                 proxy_url: str | None = None, network_backend: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.name = name
        self.proxy = proxy_url is not None
        self._proxy_url = proxy_url
        self._backend = network_backend
        self._limits = limits
        self._policy = policy
        self.transport = self._make_transport(ssl_context)
        # Requests that skip certificate checks get connections of their own, made on demand.
        self._insecure: httpx.AsyncHTTPTransport | None = None
        self.admission = Admission(limits.max_connections, limits.max_connections_per_host)
        self.health = ProxyHealth(policy.proxy_eject_failures if self.proxy else 0, policy.proxy_eject_seconds)
        self.dynamic = DynamicLimit(policy.dynamic_floor, limits.max_connections) if policy.dynamic else None
        self.counters = PoolCounters()
        self.requests_total = 0
        self.reused_total = 0
        self.pool_timeouts_total = 0
        self.retries_total = 0
        self.retired_total = 0
        self.latency_mean = 0.0
        self.concurrency_mean = 0.0
        self._peak_demand = 0
        self._waits: collections.deque[float] = collections.deque(maxlen=WAIT_SAMPLES)
        # Per connection: [first seen (monotonic), requests served]; weak, so closed ones vanish.
        self._seen: weakref.WeakKeyDictionary[httpcore.AsyncConnectionInterface, list[float]] = (
            weakref.WeakKeyDictionary()
        )
        self._hygiene = bool(policy.max_requests_per_connection or policy.max_connection_age)
        self._suspects: weakref.WeakSet[httpcore.AsyncConnectionInterface] = weakref.WeakSet()
        # Open connections as the upkeep last saw them: id -> (connection, first seen, HTTP version).
        self._lifetimes: dict[int, tuple[httpcore.AsyncConnectionInterface, float, str]] = {}
        # Tunnels: origin -> when a response last came back, and the first connection being opened.
        self._warm: dict[str, float] = {}
        self._opening: dict[str, asyncio.Event] = {}

    def _make_transport(self, ssl_context: ssl.SSLContext) -> httpx.AsyncHTTPTransport:
        limits = self._limits
        transport = httpx.AsyncHTTPTransport(
            verify=ssl_context,
            http2=True,
            limits=httpx.Limits(
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
            ),
            proxy=httpx.Proxy(self._proxy_url) if self._proxy_url else None,
            retries=0,
        )
        compat.linear_pool_assignment(transport)
        if self._backend is not None:
            compat.install_network_backend(transport, self._backend)
        return transport

    def transport_for(self, insecure: bool) -> httpx.AsyncHTTPTransport:
        """The transport for verified requests, or the one for ``tls_insecure_skip_verify`` ones."""
        if not insecure:
            return self.transport
        if self._insecure is None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self._insecure = self._make_transport(context)
        return self._insecure

    def _transports(self) -> list[httpx.AsyncHTTPTransport]:
        return [self.transport] if self._insecure is None else [self.transport, self._insecure]

    def _connections(self) -> list[httpcore.AsyncConnectionInterface]:
        return [c for t in self._transports() for c in compat.connections(t) if not c.is_closed()]

    @property
    def limits(self) -> PoolLimits:
        """The limits in force (the ceiling when dynamic sizing is on)."""
        return self._limits

    @property
    def working_limit(self) -> int:
        """Requests admitted at most right now."""
        return self.dynamic.current if self.dynamic is not None else self._limits.max_connections

    @property
    def load(self) -> int:
        """Requests in flight plus waiting (the demand on this pool)."""
        return self.admission.active + self.admission.waiting

    @property
    def available(self) -> bool:
        """False while the proxy is ejected."""
        return self.health.available(time.monotonic())

    async def open_first(self, origin: str) -> bool:
        """Through a proxy, let one request open the first tunnel to an HTTPS ``origin``;
        returns True for that request, which must then call :meth:`opened`.

        httpcore cannot know a tunnel will speak HTTP/2 before its TLS handshake, so a
        burst of requests to a new origin opens one tunnel each (and every later request
        scans them all). Waiting for the first one lets the burst share its HTTP/2
        connection, as a direct HTTPS pool does by itself. Other requests wait here,
        before admission, until the opener has response headers (or has failed).
        """
        if time.monotonic() - self._warm.get(origin, -1e9) < self._limits.keepalive_expiry:
            return False
        opening = self._opening.get(origin)
        if opening is None:
            self._opening[origin] = asyncio.Event()
            return True
        await opening.wait()
        return False

    def opened(self, origin: str, *, ok: bool) -> None:
        """The opener of ``origin`` got its response (``ok``) or failed: release the others."""
        if ok:
            self._warm[origin] = time.monotonic()
        opening = self._opening.pop(origin, None)
        if opening is not None:
            opening.set()

    def set_limits(self, limits: PoolLimits) -> None:
        """Apply ``limits`` live; in-flight requests are not touched.

        Growing admits waiting requests at once. Shrinking admits nobody new until
        in-flight requests drop below the new cap; surplus idle connections are closed
        by :meth:`tend` (the engine calls it every second).
        """
        self._limits = limits
        if self.dynamic is not None:
            self.dynamic.set_ceiling(limits.max_connections)
        for transport in self._transports():
            compat.apply_limits(
                transport,
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
            )
        self.admission.resize(self.working_limit, limits.max_connections_per_host)

    def acquired(self, wait: float) -> None:
        """A request got a connection slot after ``wait`` seconds (for the demand peak)."""
        self._peak_demand = max(self._peak_demand, self.load)
        self._waits.append(wait)

    def served(self, origin: str, *, reused: bool, latency: float) -> None:
        """Count one response from ``origin``; ``latency`` is the seconds it held its connection."""
        if self.proxy:
            self._warm[origin] = time.monotonic()
        self.requests_total += 1
        self.reused_total += reused
        self.latency_mean += EWMA_WEIGHT * (latency - self.latency_mean) if self.requests_total > 1 else latency

    async def after_response(self, network_stream: object | None) -> None:
        """Retire the connection that served a response if it reached its max requests or age."""
        if not self._hygiene or network_stream is None:
            return
        connection = next(
            (c for t in self._transports() if (c := compat.connection_of(t, network_stream)) is not None), None
        )
        if connection is None:
            return
        now = time.monotonic()
        seen = self._seen.setdefault(connection, [now, 0])
        seen[1] += 1
        await self._retire_if_due(connection, seen, now)

    async def _retire_if_due(self, connection: httpcore.AsyncConnectionInterface, seen: list[float], now: float
                             ) -> None:
        policy = self._policy
        due = (policy.max_requests_per_connection and seen[1] >= policy.max_requests_per_connection) or (
            policy.max_connection_age and now - seen[0] >= policy.max_connection_age
        )
        if not due or connection.is_closed():
            return
        if connection.is_idle():
            self.retired_total += 1
            await connection.aclose()
        else:
            compat.stop_new_requests(connection)

    async def tend(self, now: float) -> list[tuple[float, str]]:
        """Once a second: follow demand (dynamic mode), retire aged connections, close
        expired or surplus idle connections (httpcore only does that when a request comes).

        Returns ``(lifetime seconds, HTTP version)`` of the connections found closed since
        the last upkeep."""
        demand, self._peak_demand = max(self._peak_demand, self.load), self.load
        for origin in [o for o, seen in self._warm.items() if now - seen > self._limits.keepalive_expiry]:
            del self._warm[origin]
        self.concurrency_mean += EWMA_WEIGHT * (demand - self.concurrency_mean)
        if self.dynamic is not None:
            before = self.dynamic.current
            if self.dynamic.update(demand) != before:
                self.admission.resize(self.dynamic.current, self._limits.max_connections_per_host)
                logger.info("pool %s: working limit %d -> %d (demand %d)", self.name, before, self.dynamic.current,
                            demand)
        connections = self._connections()
        if self._policy.max_connection_age:
            for connection in connections:
                seen = self._seen.setdefault(connection, [now, 0])
                await self._retire_if_due(connection, seen, now)
            connections = [c for c in connections if not c.is_closed()]
        await self._close_orphans(connections)
        connections = [c for c in connections if not c.is_closed()]
        idle = [c for c in connections if c.is_idle()]
        active = len(connections) - len(idle)
        keep = max(0, min(self._limits.max_keepalive_connections, self.working_limit - active))
        doomed = [c for c in idle if c.has_expired() or compat.peer_closed(c)]
        doomed += [c for c in idle if c not in doomed][keep:]
        for connection in doomed:
            self.retired_total += 1
            await connection.aclose()
        return self._closed_since_last(now)

    def _closed_since_last(self, now: float) -> list[tuple[float, str]]:
        open_now = {id(c): c for c in self._connections()}
        closed = [(now - seen, version) for key, (c, seen, version) in self._lifetimes.items()
                  if open_now.get(key) is not c]
        self._lifetimes = {
            key: self._lifetimes[key] if key in self._lifetimes and self._lifetimes[key][0] is c
            else (c, now, "HTTP/2" if "HTTP/2" in c.info() else "HTTP/1.1")
            for key, c in open_now.items()
        }
        return closed

    async def _close_orphans(self, connections: list[httpcore.AsyncConnectionInterface]) -> None:
        """Close connections that stay busy while no request to their origin is admitted.

        httpcore's clean-up is not safe at every point against cancellation: a request
        cancelled between connect and first use leaves an HTTP/1.1 connection in state
        NEW, one cancelled while its stream closes leaves an HTTP/2 connection ACTIVE with
        no stream. Neither is idle, available nor closed again, and each counts against
        max_connections for good. Seen busy with no request in two upkeeps running: closed.
        """
        origins = [httpcore.URL(host).origin for host in self.admission.hosts()]
        busy = [c for c in connections if not c.is_idle() and not any(c.can_handle_request(o) for o in origins)]
        orphans = [c for c in busy if c in self._suspects]
        self._suspects = weakref.WeakSet(busy)
        for connection in orphans:
            logger.debug("closing orphaned connection %s", connection.info())
            self.retired_total += 1
            await connection.aclose()

    def snapshot(self, processing_mean: float = 0.0) -> PoolSnapshot:
        """Stats now; reads nothing private outside the compat module."""
        connections = self._connections()
        idle = sum(c.is_idle() for c in connections)
        waits = sorted(self._waits)
        now = time.monotonic()
        ejected = not self.health.available(now)
        return PoolSnapshot(
            pool=self.name,
            limits=self._limits,
            connections_open=len(connections),
            connections_idle=idle,
            connections_active=len(connections) - idle,
            http2_streams=self.counters.http2_streams,
            requests_active=self.admission.active,
            requests_waiting=self.admission.waiting,
            connections_created_total=self.counters.connections_created,
            requests_total=self.requests_total,
            reuse_ratio=self.reused_total / self.requests_total if self.requests_total else 0.0,
            acquire_wait_p50=_percentile(waits, 0.50),
            acquire_wait_p90=_percentile(waits, 0.90),
            acquire_wait_p99=_percentile(waits, 0.99),
            pool_timeouts_total=self.pool_timeouts_total,
            working_limit=self.working_limit,
            latency_mean=self.latency_mean,
            processing_mean=processing_mean,
            concurrency_mean=self.concurrency_mean,
            ejected=ejected,
            ejected_until=time.time() + (self.health.ejected_until - now) if ejected else 0.0,
            consecutive_failures=self.health.consecutive,
            retries_total=self.retries_total,
            connections_retired_total=self.retired_total,
        )

    async def aclose(self) -> None:
        """Close every connection of this pool."""
        for transport in self._transports():
            await transport.aclose()
