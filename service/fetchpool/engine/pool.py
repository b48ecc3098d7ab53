"""One connection pool: an httpx transport (direct or through one proxy), its admission
limiter, the request lease, live limits, connection hygiene, proxy health and public stats."""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass

import httpx

from fetchpool.config import PoolLimits, PoolPolicy
from fetchpool.engine._httpcore.shield import shielded
from fetchpool.engine.admission import Admission, AdmissionTimeout
from fetchpool.engine.phases import Phase, PhaseRecorder, PoolCounters
from fetchpool.engine.proxies import ProxyHealth
from fetchpool.engine.sizing import DynamicLimit
from fetchpool.engine.transports import PoolTransport
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
    """A pool named ``name`` ("direct" or a proxy URL without credentials) on ``transport``;
    ``proxy`` says it reaches its targets through a forward proxy."""

    def __init__(self, name: str, limits: PoolLimits, policy: PoolPolicy, transport: PoolTransport,
                 *, proxy: bool = False) -> None:
        self.name = name
        self.proxy = proxy
        self._limits = limits
        self._policy = policy
        self.transport = transport
        self._requests_cap = transport.requests_cap(limits)
        self.admission = Admission(self._requests_cap, limits.max_connections_per_host)
        self.health = ProxyHealth(policy.proxy_eject_failures if self.proxy else 0, policy.proxy_eject_seconds)
        self.dynamic = DynamicLimit(policy.dynamic_floor, self._requests_cap) if policy.dynamic else None
        self.counters = PoolCounters()
        self.requests_total = 0
        self.reused_total = 0
        self.pool_timeouts_total = 0
        self.retries_total = 0
        self.latency_mean = 0.0
        self.concurrency_mean = 0.0
        self._peak_demand = 0
        self._waits: collections.deque[float] = collections.deque(maxlen=WAIT_SAMPLES)
        # Open connections as the upkeep last saw them: key -> (first seen, HTTP version).
        self._lifetimes: dict[Hashable, tuple[float, str]] = {}

    def transport_for(self, insecure: bool) -> httpx.AsyncBaseTransport:
        """The httpx transport for verified requests, or the one for ``tls_insecure_skip_verify`` ones."""
        return self.transport.for_request(insecure)

    @property
    def limits(self) -> PoolLimits:
        """The limits in force (the ceiling when dynamic sizing is on)."""
        return self._limits

    @property
    def working_limit(self) -> int:
        """Requests admitted at most right now: ``max_requests`` (what 0 stands for), or less when
        dynamic sizing follows a lower demand. ``max_connections`` caps the sockets that carry them."""
        return self.dynamic.current if self.dynamic is not None else self._requests_cap

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
                # A body read to its end closed its response already (httpx does, at the end of
                # aiter_raw): then there is often nothing to release, and no task to shield it in.
                response = lease.response
                if response is not None and self.transport.needs_release(response):
                    await shielded(self.transport.release(response))
            finally:
                self.admission.release(host)

    def set_limits(self, limits: PoolLimits) -> None:
        """Apply ``limits`` live; in-flight requests are not touched.

        Growing admits waiting requests at once. Shrinking admits nobody new until
        in-flight requests drop below the new cap; surplus idle connections are closed
        by :meth:`tend` (the engine calls it every second).
        """
        self._limits = limits
        self.transport.apply_limits(limits)
        self._set_requests_cap(self.transport.requests_cap(limits))

    def _acquired(self, wait: float) -> None:
        """A request got a connection after ``wait`` seconds (for the demand peak and percentiles)."""
        self._peak_demand = max(self._peak_demand, self.load)
        self._waits.append(wait)

    def _served(self, *, reused: bool, latency: float) -> None:
        """Count one response; ``latency`` is the seconds it held its connection."""
        self.requests_total += 1
        self.reused_total += reused
        self.latency_mean += EWMA_WEIGHT * (latency - self.latency_mean) if self.requests_total > 1 else latency

    async def tend(self, now: float) -> list[tuple[float, str]]:
        """Once a second: follow demand (dynamic mode), retire aged connections, close
        expired or surplus idle connections (httpcore only does that when a request comes).

        Returns ``(lifetime seconds, HTTP version)`` of the connections found closed since
        the last upkeep."""
        self._follow_requests_cap()
        demand, self._peak_demand = max(self._peak_demand, self.load), self.load
        self.concurrency_mean += EWMA_WEIGHT * (demand - self.concurrency_mean)
        if self.dynamic is not None:
            before = self.dynamic.current
            if self.dynamic.update(demand) != before:
                self.admission.resize(self.dynamic.current, self._limits.max_connections_per_host)
                logger.info("pool %s: working limit %d -> %d (demand %d)", self.name, before, self.dynamic.current,
                            demand)
        # Idle connections are kept up to what the sockets' cap leaves (working_limit counts requests).
        await self.transport.tend(now, self._limits.max_connections)
        return self._closed_since_last(now)

    def _follow_requests_cap(self) -> None:
        """A transport's cap can change as it learns its servers (curl: their stream limits)."""
        cap = self.transport.requests_cap(self._limits)
        if cap != self._requests_cap:
            self._set_requests_cap(cap)

    def _set_requests_cap(self, cap: int) -> None:
        self._requests_cap = cap
        if self.dynamic is not None:
            self.dynamic.set_ceiling(cap)
        self.admission.resize(self.working_limit, self._limits.max_connections_per_host)

    def _closed_since_last(self, now: float) -> list[tuple[float, str]]:
        open_now = self.transport.open_connections()
        closed = [(now - seen, version) for key, (seen, version) in self._lifetimes.items() if key not in open_now]
        self._lifetimes = {key: self._lifetimes.get(key) or (now, version) for key, version in open_now.items()}
        return closed

    def snapshot(self, processing_mean: float = 0.0) -> PoolSnapshot:
        """Stats now (the connections as the transport counts them)."""
        connections = self.transport.counts()
        waits = sorted(self._waits)
        now = time.monotonic()
        ejected = not self.health.available(now)
        return PoolSnapshot(
            pool=self.name,
            limits=self._limits,
            connections_open=connections.open,
            connections_idle=connections.idle,
            connections_active=connections.active,
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
            connections_retired_total=self.transport.retired_total,
        )

    async def aclose(self) -> None:
        """Close every connection of this pool."""
        await self.transport.aclose()


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
        response's body is still to be read. Raises what httpx raises.

        Admitted, a request may still wait in the transport for a connection or an HTTP/2 stream
        (every one taken): that wait gets what is left of ``pool_timeout`` after admission's."""
        pool = self._pool
        waited = time.monotonic() - self._wait.start
        request.extensions["timeout"] = {**request.extensions.get("timeout", {}),
                                         "pool": max(0.001, pool.limits.pool_timeout - waited)}
        try:
            self.response = await client.send(request, stream=True)
        except httpx.PoolTimeout:
            pool.pool_timeouts_total += 1
            raise
        pool._acquired(self._wait.end - self._wait.start)
        return self.response

    @property
    def reused(self) -> bool:
        """Whether the response came on a connection opened before this request."""
        return not self._recorder.connected

    def served(self) -> None:
        """The response was read whole: count it."""
        self._pool._served(reused=self.reused, latency=time.monotonic() - self._wait.end)
