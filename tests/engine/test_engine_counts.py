"""Issue 12 §2, at the finest grain: while a pool closes its connections, its count of open
connections equals the sockets the OS shows at every turn of the event loop, not only once
things have settled.

httpcore marks a connection CLOSED before it closes the socket, and asyncio closes the
descriptor a turn of the loop later; a pool's assignment also takes connections out of its list
and then closes them one after another. A stats read in between (an exporter, ``GetPoolStats``,
the invariant check of the other tests) saw fewer connections than sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from enginekit import make_settings, peers_of
from fetchpool.config import PoolLimits
from fetchpool.engine import Engine, FetchSpec
from support import AppServer, Certs
from support.sockets import tcp_sockets

CONNECTIONS = 4


async def _open_connections(engine: Engine, url: str) -> None:
    """``CONNECTIONS`` HTTP/1.1 connections, idle: as many requests at once, each held 0.2 s."""
    async with asyncio.timeout(20):
        outcomes = await asyncio.gather(*(engine.fetch(FetchSpec(url=f"{url}/delay?s=0.2&i={i}"))
                                          for i in range(CONNECTIONS)))
    assert [o.error_message for o in outcomes if not o.ok] == []
    assert engine.snapshots()[0].connections_open == CONNECTIONS


async def _count_at_every_turn(engine: Engine, url: str, close: asyncio.Task[object]) -> list[str]:
    """Compare the pool's count with the OS at every turn of the loop until ``close`` is done
    (and a few turns more); returns the mismatches seen."""
    peers = peers_of(engine, [url])[engine.pools[0].name]
    seen: list[str] = []
    after = 0
    deadline = time.monotonic() + 10
    while after < 5 and time.monotonic() < deadline:
        after += close.done()
        counted = engine.snapshots()[0].connections_open
        sockets = len(tcp_sockets(peers))
        if counted != sockets:
            seen.append(f"connections_open={counted}, the OS has {sockets}")
        await asyncio.sleep(0)
    await close
    return seen


@pytest.mark.parametrize("how", ["expired", "surplus"])
async def test_a_pool_counts_a_closing_connection_until_its_socket_is_closed(
    how: str, make_engine: ..., certs: Certs, app_server: AppServer,
) -> None:
    """``expired``: the upkeep closes idle connections past their keep-alive expiry, one by
    one. ``surplus``: the keep-alive cap drops to 0, so the pool's assignment takes every idle
    connection out of its list and closes them one after another. (Without counting closing
    connections, 1 to 4 turns of the loop saw one connection fewer than the OS.)"""
    limits = PoolLimits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS,
                        keepalive_expiry=0.05 if how == "expired" else 60.0, pool_timeout=5)
    engine: Engine = await make_engine(make_settings(certs, limits=limits))
    url = app_server.http_url
    await _open_connections(engine, url)
    pool = engine.pools[0]
    if how == "expired":
        await asyncio.sleep(0.1)
    else:
        pool.set_limits(dataclasses.replace(limits, max_keepalive_connections=0))
    close = asyncio.create_task(pool.tend(time.monotonic()))
    mismatches = await _count_at_every_turn(engine, url, close)
    assert mismatches == [], mismatches
    assert engine.snapshots()[0].connections_open == 0
