"""Helpers of the in-process engine tests: settings, peers, the invariant against an Engine.

The engine runs in the test's own event loop (no fetchpool subprocess), so a fault reproduces
in a second and a debugger reaches it. Its sockets are this process's sockets.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import uuid
from collections.abc import Collection, Iterable
from typing import Any

import httpx
from fetchpool.config import FetchSettings, PoolLimits, PoolPolicy, RetryPolicy, Settings, Timeouts
from fetchpool.engine import Engine, FetchSpec, Outcome
from fetchpool.engine.fetcher import TEND_INTERVAL
from support import AppServer, Certs
from support.sockets import BARRIER_S, Peer, Served, assert_invariant

LOOPBACK = ("127.0.0.0/8", "::1/128")
#: The transport of the engines the current test makes (tests/engine/conftest.py sets it per test).
TRANSPORT = ["httpcore"]
#: How a pool reaches its targets: directly, or through the proxy fixture of that kind.
ROUTES = ("direct", "squid", "tinyproxy", "socks5")


def make_settings(
    certs: Certs,
    *,
    proxy: str | None = None,
    limits: PoolLimits | None = None,
    retry: RetryPolicy | None = None,
    timeouts: Timeouts | None = None,
    policy: PoolPolicy | None = None,
    **fetch: Any,
) -> Settings:
    """Settings for an engine that trusts the tests' CA and may reach loopback, on the current
    test's transport (TRANSPORT).

    ``fetch`` overrides FetchSettings fields. The pool timeout defaults to 3 s (not 30) so a
    lost slot shows as POOL_TIMEOUT within a test's time.
    """
    return Settings(
        limits=limits or PoolLimits(pool_timeout=3.0),
        retry=retry or RetryPolicy(),
        timeouts=timeouts or Timeouts(),
        pool=policy or PoolPolicy(),
        fetch=FetchSettings(
            proxies=(proxy,) if proxy else (),
            ca_bundle=str(certs.ca_pem),
            allow_targets=LOOPBACK,
            **{"transport": TRANSPORT[0], **fetch},
        ),
    )


def peer(url: str) -> Peer:
    """(host, port) of a URL (a target's or a proxy's)."""
    parsed = httpx.URL(url)
    default = {"https": 443, "http": 80}.get(parsed.scheme, 1080)
    return parsed.host, parsed.port or default


def peers_of(engine: Engine, targets: Iterable[str]) -> dict[str, set[Peer]]:
    """The peers of each pool: the proxy for a proxied pool, ``targets`` (URLs) for the direct one."""
    direct = {peer(url) for url in targets}
    return {pool.name: ({peer(pool.name)} if pool.proxy else direct) for pool in engine.pools}


def summary(outcomes: Iterable[Outcome], limit: int = 3) -> str:
    """Failures grouped by kind, with a few messages, attempts and reuse (for assertion messages)."""
    groups: dict[str, list[Outcome]] = collections.defaultdict(list)
    for outcome in outcomes:
        key = outcome.error_kind.name if outcome.error_kind is not None else f"HTTP {outcome.status_code}"
        groups[key].append(outcome)
    parts = []
    for key, group in sorted(groups.items(), key=lambda item: -len(item[1])):
        examples = "; ".join(
            f"{o.error_message or o.status_code} (attempts={o.attempts}, reused={o.connection_reused})"
            for o in group[:limit]
        )
        parts.append(f"{len(group)} x {key}: {examples}")
    return " | ".join(parts)


@dataclasses.dataclass
class EngineProbe:
    """The full-width probe of the invariant for an engine: a barrier of the app server, over
    plain HTTP/1.1 (one connection per request)."""

    engine: Engine
    app_server: AppServer

    async def __call__(self, pool: str, count: int) -> list[Served]:
        assert [p.name for p in self.engine.pools] == [pool], "the probe routes through an engine's only pool"
        url = f"{self.app_server.http_url}/barrier?key={uuid.uuid4().hex}&n={count}&s={BARRIER_S}"
        spec = FetchSpec(url=url, timeout=BARRIER_S + 10)
        outcomes = await asyncio.gather(*(self.engine.fetch(spec) for _ in range(count)))
        return [
            Served(o.status_code, o.error_kind.name if o.error_kind is not None else "",
                   o.error_message or o.body.decode(errors="replace"))
            for o in outcomes
        ]


async def assert_engine_invariant(
    engine: Engine, targets: Collection[str], app_server: AppServer, what: str = "", *, probe: bool = True
) -> None:
    """The invariant of issue 12 §2 for an in-process engine whose direct pool reached ``targets``
    (URLs); the probe goes to ``app_server``'s plain HTTP port, one connection per request."""

    async def read_stats() -> list[Any]:
        return list(engine.snapshots())

    await assert_invariant(
        read_stats,
        peers_of(engine, [*targets, app_server.http_url]),
        upkeep=TEND_INTERVAL,
        probe=EngineProbe(engine, app_server) if probe else None,
        what=what,
    )
