"""The ``curl`` transport: libcurl (with nghttp2 and OpenSSL, as pycurl's wheels bundle them)
under the same ``httpx.AsyncClient``, one multi handle per pool (and one more for requests that
skip certificate checks), driven by the running asyncio loop (``driver.py``: libcurl's
multi-socket API, as pycurl's ``AsyncCurlMulti`` does, with less work per transfer).

Why it exists, measured (issue 15's evaluation): through the same client, libcurl's HTTP/2 costs
about a fifth of the CPU per request of httpcore + h2, and it reports what fetchpool promises
(queue time, connect, TLS, TTFB, reuse, HTTP version, peer address) per transfer. What it
reports and supports differently is in the README ("Transports").
"""

from __future__ import annotations

from collections.abc import Hashable

import httpx

from fetchpool.config import PoolLimits
from fetchpool.engine.transports.base import ConnectionCounts, PoolTransport, TransportConfig
from fetchpool.engine.transports.curl.engine import CurlEngine
from fetchpool.engine.transports.curl.ledger import peer_closed

__all__ = ["CurlTransport"]


class CurlTransport(PoolTransport):
    """A pool on libcurl (see the module docstring and ``engine.py``)."""

    def __init__(self, config: TransportConfig) -> None:
        self._config = config
        self._limits = config.limits
        self._verified = self._make(verify=True)
        self._insecure: CurlEngine | None = None

    def _make(self, *, verify: bool) -> CurlEngine:
        c = self._config
        return CurlEngine(ca_bundle=c.ca_bundle, verify=verify, proxy=c.proxy_url, guard=c.guard,
                          limits=self._limits, policy=c.policy, max_header_bytes=c.max_header_bytes)

    def for_request(self, insecure: bool) -> httpx.AsyncBaseTransport:
        if not insecure:
            return self._verified
        if self._insecure is None:
            self._insecure = self._make(verify=False)
        return self._insecure

    def _engines(self) -> list[CurlEngine]:
        return [self._verified] if self._insecure is None else [self._verified, self._insecure]

    def apply_limits(self, limits: PoolLimits) -> None:
        self._limits = limits
        for engine in self._engines():
            engine.set_limits(limits)

    def requests_cap(self, limits: PoolLimits) -> int:
        """``max_connections`` x the streams per connection the pool's servers allow (the lowest
        learned, ``streams.py``); one per connection until a server's limit is known.

        libcurl assumes 100 streams on a new HTTP/2 connection until the server's SETTINGS
        arrive, so with more requests in flight than connections and no cap of ours it overshoots
        a smaller server limit on every connection it opens under load, and the streams refused
        go again on yet more connections (nginx with 4 streams and max_connections 5 saw 7
        connections). The pool follows a change at its next upkeep."""
        streams = min((e.streams.cap for e in self._engines() if e.streams.cap), default=1)
        return min(limits.requests_cap, limits.max_connections * streams)

    def counts(self) -> ConnectionCounts:
        open_ = idle = 0
        for engine in self._engines():
            alive = {c.fd for c in engine.ledger.alive()}
            busy = {ex.fd for ex in engine.in_flight} & alive
            open_ += len(alive)
            idle += len(alive) - len(busy)
        return ConnectionCounts(open=open_, idle=idle)

    def open_connections(self) -> dict[Hashable, str]:
        return {(id(engine), c.key): c.version for engine in self._engines() for c in engine.ledger.alive()}

    @property
    def retired_total(self) -> int:
        return sum(engine.retired_total for engine in self._engines())

    async def release(self, response: httpx.Response) -> None:
        # A connection at its request limit is retired once its transfers ended (retire.py).
        await response.aclose()

    async def tend(self, now: float, max_connections: int) -> None:
        # libcurl applies keep-alive expiry, max age and the idle cap itself, but only while it
        # works (when it looks for a connection to reuse). With nothing in flight, connections
        # due to close are closed here: all of them, as libcurl cannot close one idle connection.
        policy = self._config.policy
        limits = self._limits
        for engine in self._engines():
            if engine.in_flight:
                continue
            alive = engine.ledger.alive()
            keep = max(0, min(limits.max_keepalive_connections, max_connections))
            due = len(alive) > keep or any(
                now - c.last_used >= limits.keepalive_expiry
                or (policy.max_connection_age and now - c.opened >= policy.max_connection_age)
                or peer_closed(c.fd)
                for c in alive
            )
            if due:
                engine.retired += await engine.close_idle()

    async def aclose(self) -> None:
        for engine in self._engines():
            await engine.aclose()
