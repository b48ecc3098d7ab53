"""run_batch_ready, what the packed RPCs send: which results go together, and that a list holds
its slots until the consumer asks for the next (the batch's memory bound)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from enginekit import make_settings
from fetchpool.engine import FetchSpec, Outcome
from fetchpool.engine.batch import run_batch_ready
from support import AppServer, Certs


def _items(app_server: AppServer, count: int, first: float = 0.3) -> AsyncIterator[tuple[int, FetchSpec]]:
    """``count`` fetches answered after 0.3 s each, the first after ``first`` s."""
    async def items() -> AsyncIterator[tuple[int, FetchSpec]]:
        for i in range(count):
            yield i, FetchSpec(url=f"{app_server.http_url}/delay?s={first if i == 0 else 0.3}&i={i}")

    return items()


async def test_a_list_carries_every_result_completed_while_the_consumer_was_busy(
    make_engine: ..., certs: Certs, app_server: AppServer
) -> None:
    engine = await make_engine(make_settings(certs))
    lists: list[list[tuple[int, Outcome]]] = []
    async with asyncio.timeout(20):
        async for ready in run_batch_ready(engine, _items(app_server, 10, first=0.02), 10):
            lists.append(ready)
            # Busy until the other nine have completed (all ten started at once).
            while engine.snapshots()[0].requests_active:  # noqa: ASYNC110 - the pool has no event for it
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # from the pool's release to the batch's queue: a few loop turns
    assert [len(ready) for ready in lists] == [1, 9]
    assert sorted(i for ready in lists for i, _ in ready) == list(range(10))
    assert all(outcome.status_code == 200 for ready in lists for _, outcome in ready)


async def test_most_bounds_a_list_and_its_slots_come_back_when_the_next_is_asked_for(
    make_engine: ..., certs: Certs, app_server: AppServer
) -> None:
    engine = await make_engine(make_settings(certs))
    sizes: list[int] = []
    over: list[str] = []
    async with asyncio.timeout(30):
        async for ready in run_batch_ready(engine, _items(app_server, 8), 4, most=3):
            sizes.append(len(ready))
            await asyncio.sleep(0.5)  # longer than a fetch: a fetch let start meanwhile has shown up
            pool = engine.snapshots()[0]
            started = pool.requests_total + pool.requests_active + pool.requests_waiting
            consumed = sum(sizes[:-1])  # the list held now keeps its slots
            if started > consumed + 4:
                over.append(f"{started} fetches started while holding list {len(sizes)}, {consumed} consumed")
    assert sum(sizes) == 8 and max(sizes) <= 3, sizes
    assert not over, over
