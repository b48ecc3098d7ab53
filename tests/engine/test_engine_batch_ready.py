"""run_batch_ready, what the packed RPCs send: which results go together, and that a list holds
its slots until the consumer asks for the next (the batch's memory bound)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from enginekit import make_settings
from fetchpool.engine import FetchSpec, Outcome
from fetchpool.engine.batch import run_batch_ready
from support import AppServer, Certs


def _items(app_server: AppServer, count: int) -> AsyncIterator[tuple[int, FetchSpec]]:
    async def items() -> AsyncIterator[tuple[int, FetchSpec]]:
        for i in range(count):
            yield i, FetchSpec(url=f"{app_server.http_url}/delay?s=0.3&i={i}")

    return items()


async def test_a_list_carries_every_result_completed_while_the_consumer_was_busy(
    make_engine: ..., certs: Certs, app_server: AppServer
) -> None:
    engine = await make_engine(make_settings(certs))
    lists: list[list[tuple[int, Outcome]]] = []
    async with asyncio.timeout(20):
        async for ready in run_batch_ready(engine, _items(app_server, 10), 10):
            lists.append(ready)
            await asyncio.sleep(1.0)  # the other nine complete meanwhile
    assert len(lists) == 2 and lists[0], [len(r) for r in lists]
    assert sorted(i for ready in lists for i, _ in ready) == list(range(10))
    assert all(outcome.status_code == 200 for ready in lists for _, outcome in ready)


async def test_most_bounds_a_list_and_its_slots_come_back_when_the_next_is_asked_for(
    make_engine: ..., certs: Certs, app_server: AppServer
) -> None:
    engine = await make_engine(make_settings(certs))
    sizes, active = [], []
    async with asyncio.timeout(30):
        async for ready in run_batch_ready(engine, _items(app_server, 8), 4, most=3):
            sizes.append(len(ready))
            await asyncio.sleep(0.15)  # shorter than a fetch: what started after the last ask still runs
            active.append(engine.snapshots()[0].requests_active)
            await asyncio.sleep(0.3)
    assert sum(sizes) == 8 and max(sizes) <= 3, sizes
    # The first four fetches end together: lists of 3 and 1. While the consumer holds the first,
    # their slots stay taken and nothing starts; asking for the second starts three more.
    assert sizes[:2] == [3, 1], sizes
    assert active[:2] == [0, 3], f"fetches in flight while each list was held: {active}"
