"""One connection pool: an httpx transport (direct or through one proxy), its
admission limiter, its live limits and its public statistics."""

from __future__ import annotations

import collections
import ssl
from dataclasses import dataclass

import httpx

from fetchpool.config import PoolLimits
from fetchpool.engine import _httpcore_compat as compat
from fetchpool.engine.admission import Admission
from fetchpool.engine.phases import PoolCounters

#: Pool-acquire waits kept for percentiles (the most recent ones).
WAIT_SAMPLES = 2048


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """Stats of one pool at one moment (``fetchpool.v1.PoolStats``); waits in seconds."""

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

    def __init__(self, name: str, limits: PoolLimits, ssl_context: ssl.SSLContext, proxy_url: str | None = None
                 ) -> None:
        self.name = name
        self.proxy = proxy_url is not None
        self._limits = limits
        self.transport = httpx.AsyncHTTPTransport(
            verify=ssl_context,
            http2=True,
            limits=httpx.Limits(
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
            ),
            proxy=httpx.Proxy(proxy_url) if proxy_url else None,
            retries=0,
        )
        self.admission = Admission(limits.max_connections, limits.max_connections_per_host)
        self.counters = PoolCounters()
        self.requests_total = 0
        self.reused_total = 0
        self.pool_timeouts_total = 0
        self._waits: collections.deque[float] = collections.deque(maxlen=WAIT_SAMPLES)

    @property
    def limits(self) -> PoolLimits:
        """The limits in force."""
        return self._limits

    @property
    def load(self) -> int:
        """Requests in flight plus waiting (the demand on this pool)."""
        return self.admission.active + self.admission.waiting

    @property
    def available(self) -> bool:
        """Whether the proxy selector may use this pool."""
        return True

    def set_limits(self, limits: PoolLimits) -> None:
        """Apply ``limits`` live; in-flight requests are not touched.

        Growing admits waiting requests at once. Shrinking admits nobody new until
        in-flight requests drop below the new cap; surplus idle connections are closed
        by :meth:`close_surplus_idle` (the engine's reaper calls it).
        """
        self._limits = limits
        compat.apply_limits(
            self.transport,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
        )
        self.admission.resize(limits.max_connections, limits.max_connections_per_host)

    async def close_surplus_idle(self) -> int:
        """Close idle connections that expired or exceed the keep-alive or connection caps.

        Returns how many were closed. An idle connection httpcore has just handed to
        a request is safe to close: httpcore then retries that request on another one.
        """
        connections = [c for c in compat.connections(self.transport) if not c.is_closed()]
        idle = [c for c in connections if c.is_idle()]
        keep = min(self._limits.max_keepalive_connections, max(0, self._limits.max_connections - (len(connections)
                   - len(idle))))
        doomed = [c for c in idle if c.has_expired()]
        fresh = [c for c in idle if c not in doomed]
        doomed += fresh[keep:]
        for connection in doomed:
            await connection.aclose()
        return len(doomed)

    def record(self, *, wait: float, reused: bool) -> None:
        """Count one request that got a connection after ``wait`` seconds."""
        self.requests_total += 1
        self.reused_total += reused
        self._waits.append(wait)

    def snapshot(self) -> PoolSnapshot:
        """Stats now; reads nothing private outside the compat module."""
        counts = compat.count(self.transport)
        waits = sorted(self._waits)
        return PoolSnapshot(
            pool=self.name,
            limits=self._limits,
            connections_open=counts.open,
            connections_idle=counts.idle,
            connections_active=counts.active,
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
        )

    async def aclose(self) -> None:
        """Close every connection of this pool."""
        await self.transport.aclose()
