"""One connection pool: an httpx transport (direct or through one proxy), its admission
limiter, the request lease, live limits, connection hygiene, proxy health and public stats."""

from __future__ import annotations

import collections
import contextlib
import logging
import ssl
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpcore
import httpx

from fetchpool.config import PoolLimits, PoolPolicy
from fetchpool.engine import _httpcore as compat
from fetchpool.engine._httpcore.shield import shielded
from fetchpool.engine.admission import Admission, AdmissionTimeout
from fetchpool.engine.phases import Phase, PhaseRecorder, PoolCounters
from fetchpool.engine.proxies import ProxyHealth
from fetchpool.engine.sizing import DynamicLimit
from fetchpool.errors import ErrorKind, FetchFailed

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
        # Per connection: when it was first seen (monotonic), for max_connection_age; weak, so
        # closed ones vanish. (max_requests_per_connection is counted by the connection itself.)
        self._seen: weakref.WeakKeyDictionary[httpcore.AsyncConnectionInterface, float] = weakref.WeakKeyDictionary()
        self._hygiene = bool(policy.max_requests_per_connection or policy.max_connection_age)
        # Open connections as the upkeep last saw them: id -> (connection, first seen, HTTP version).
        self._lifetimes: dict[int, tuple[httpcore.AsyncConnectionInterface, float, str]] = {}

    def _make_transport(self, ssl_context: ssl.SSLContext) -> httpx.AsyncHTTPTransport:
        limits = self._limits
        return compat.make_transport(
            ssl_context=ssl_context,
            limits=httpx.Limits(max_connections=limits.max_connections,
                                max_keepalive_connections=limits.max_keepalive_connections,
                                keepalive_expiry=limits.keepalive_expiry),
            proxy=self._proxy_url,
            network_backend=self._backend,
            max_requests_per_connection=self._policy.max_requests_per_connection,
        )

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

    @contextlib.asynccontextmanager
    async def lease(self, host: str, recorder: PhaseRecorder) -> AsyncIterator[Lease]:
        """Hold a place in this pool for one request to ``host`` (``scheme://host:port``).

        Waits in the admission queue (FIFO, per-host cap) at most ``pool_timeout`` seconds,
        then raises FetchFailed(POOL_TIMEOUT). On leaving, whatever way (an error, a
        cancellation at any point), the response is closed and its connection retired if
        due, without a second cancellation being able to stop that half-way, and the place is
        given back. This is the one place that holds and releases a pool's resources.
        """
        wait = recorder.acquire_started(self.name, self.counters)
        try:
            await self.admission.acquire(host, self._limits.pool_timeout)
        except AdmissionTimeout:
            recorder.finish_attempt()
            self.pool_timeouts_total += 1
            limit = self._limits.pool_timeout
            raise FetchFailed(ErrorKind.POOL_TIMEOUT, f"no connection of pool {self.name} free within {limit:g} s"
                              ) from None
        lease = Lease(self, host, recorder, wait)
        try:
            yield lease
        finally:
            recorder.finish_attempt()
            try:
                if lease.response is not None:
                    await shielded(self._release(lease.response))
            finally:
                self.admission.release(host)

    async def _release(self, response: httpx.Response) -> None:
        """Close the response, then close its connection if it is retiring (max requests or age
        reached) and now idle. A retiring connection takes no new request, so none can slip in."""
        await response.aclose()
        if self._hygiene:
            connection = self._connection_of(response.extensions.get("network_stream"))
            if connection is not None and compat.retiring(connection) and connection.is_idle():
                self.retired_total += 1
                await connection.aclose()

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

    def _acquired(self, wait: float) -> None:
        """A request got a connection after ``wait`` seconds (for the demand peak and percentiles)."""
        self._peak_demand = max(self._peak_demand, self.load)
        self._waits.append(wait)

    def _served(self, *, reused: bool, latency: float) -> None:
        """Count one response; ``latency`` is the seconds it held its connection."""
        self.requests_total += 1
        self.reused_total += reused
        self.latency_mean += EWMA_WEIGHT * (latency - self.latency_mean) if self.requests_total > 1 else latency

    def _connection_of(self, network_stream: object | None) -> httpcore.AsyncConnectionInterface | None:
        if network_stream is None:
            return None
        return next((c for t in self._transports() if (c := compat.connection_of(t, network_stream)) is not None),
                    None)

    async def tend(self, now: float) -> list[tuple[float, str]]:
        """Once a second: follow demand (dynamic mode), retire aged connections, close
        expired or surplus idle connections (httpcore only does that when a request comes).

        Returns ``(lifetime seconds, HTTP version)`` of the connections found closed since
        the last upkeep."""
        demand, self._peak_demand = max(self._peak_demand, self.load), self.load
        self.concurrency_mean += EWMA_WEIGHT * (demand - self.concurrency_mean)
        if self.dynamic is not None:
            before = self.dynamic.current
            if self.dynamic.update(demand) != before:
                self.admission.resize(self.dynamic.current, self._limits.max_connections_per_host)
                logger.info("pool %s: working limit %d -> %d (demand %d)", self.name, before, self.dynamic.current,
                            demand)
        if self._policy.max_connection_age:
            for connection in self._connections():
                if now - self._seen.setdefault(connection, now) >= self._policy.max_connection_age:
                    compat.stop_new_requests(connection)
        for transport in self._transports():
            await compat.sweep(transport)
        connections = self._connections()
        idle = [c for c in connections if c.is_idle()]
        active = len(connections) - len(idle)
        keep = max(0, min(self._limits.max_keepalive_connections, self.working_limit - active))
        doomed = [c for c in idle if c.has_expired() or compat.retiring(c) or compat.peer_closed(c)]
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
            connections_retired_total=self.retired_total + sum(compat.orphans_closed(t) for t in self._transports()),
        )

    async def aclose(self) -> None:
        """Close every connection of this pool."""
        for transport in self._transports():
            await transport.aclose()


class Lease:
    """One request's place in a pool (see :meth:`Pool.lease`): send through it, read the
    body, then say :meth:`served`."""

    __slots__ = ("_pool", "_recorder", "_wait", "host", "response")

    def __init__(self, pool: Pool, host: str, recorder: PhaseRecorder, wait: Phase) -> None:
        self._pool = pool
        self.host = host
        self._recorder = recorder
        self._wait = wait
        self.response: httpx.Response | None = None

    async def send(self, client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through ``client`` (its transport routes it to this pool); the
        response's body is still to be read. Raises what httpx raises."""
        self.response = await client.send(request, stream=True)
        self._pool._acquired(self._wait.end - self._wait.start)
        return self.response

    @property
    def reused(self) -> bool:
        """Whether the response came on a connection opened before this request."""
        return not self._recorder.connected

    def served(self) -> None:
        """The response was read whole: count it."""
        self._pool._served(reused=self.reused, latency=time.monotonic() - self._wait.end)
