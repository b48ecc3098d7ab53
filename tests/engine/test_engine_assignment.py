"""The pool's request assignment (engine/_httpcore/pool.py) through real requests, in-process: idle
connections are counted as idle (httpcore 1.0.9 counted every connection, and closed idle ones as
soon as the pool held more than max_keepalive_connections), kept ones are reused, and a pool at
max_connections replaces an idle connection rather than making a request wait."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import enginekit
import pytest
from enginekit import make_settings
from fetchpool.config import PoolLimits
from fetchpool.engine import FetchSpec
from support import AppServer, Certs


@pytest.fixture(autouse=True)
def transport() -> Iterator[str]:
    """The httpcore transport's pool only (overrides tests/engine/conftest.py's, which runs every
    test once per transport): libcurl's connection cache follows its own rules (README)."""
    enginekit.TRANSPORT[0] = "httpcore"
    yield "httpcore"


async def test_idle_connections_up_to_the_keepalive_limit_stay_while_others_are_busy(
    make_engine, certs: Certs, app_server: AppServer
) -> None:
    limits = PoolLimits(max_connections=6, max_keepalive_connections=3, keepalive_expiry=30.0, pool_timeout=5.0)
    engine = await make_engine(make_settings(certs, limits=limits))
    base = app_server.http_url
    long = [asyncio.ensure_future(engine.fetch(FetchSpec(url=f"{base}/delay?s=1.5&long={i}"))) for i in range(3)]
    short = await asyncio.gather(*(engine.fetch(FetchSpec(url=f"{base}/delay?s=0.2&short={i}")) for i in range(3)))
    assert all(o.status_code == 200 for o in short)
    pool = engine.snapshots()[0]
    # Three busy and three idle: the idle ones are within max_keepalive_connections and stay
    # (counting all six connections as idle would close them).
    assert (pool.connections_created_total, pool.connections_open, pool.connections_idle) == (6, 6, 3)
    again = await asyncio.gather(*(engine.fetch(FetchSpec(url=f"{base}/delay?s=0.1&again={i}")) for i in range(3)))
    assert all(o.status_code == 200 and o.connection_reused for o in again)
    assert engine.snapshots()[0].connections_created_total == 6
    assert all(o.status_code == 200 for o in await asyncio.gather(*long))


async def test_a_full_pool_replaces_an_idle_connection_for_another_origin(make_engine, certs: Certs,
                                                                          app_server: AppServer) -> None:
    limits = PoolLimits(max_connections=2, max_keepalive_connections=2, keepalive_expiry=30.0, pool_timeout=2.0)
    engine = await make_engine(make_settings(certs, limits=limits))
    plain, secure = app_server.http_url, app_server.https_url.replace("127.0.0.1", "localhost")
    first = await asyncio.gather(*(engine.fetch(FetchSpec(url=f"{plain}/delay?s=0.1&p={i}")) for i in range(2)))
    assert all(o.status_code == 200 for o in first) and engine.snapshots()[0].connections_idle == 2
    # Another origin, the pool full of idle connections: one is closed for it at once.
    other = await engine.fetch(FetchSpec(url=f"{secure}/echo"))
    assert other.status_code == 200 and other.timings.pool_wait < 1.0
    pool = engine.snapshots()[0]
    assert pool.connections_open == 2 and pool.connections_created_total == 3
