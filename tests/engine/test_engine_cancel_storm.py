"""Issue 12 §2, the soak: thousands of fetches against a slow (2 s) target, each cancelled by its
caller about 50 ms after it started (randomized, seeded), 50 at a time, through a pool of 10.
Afterwards the pool's stats match the OS's sockets and it serves 10 requests at once again.

Two ways of cancelling, as the gRPC layer does: the fetch task itself (a unary Fetch whose call
is cancelled) and the consumer of a batch (a FetchMany/FetchStream whose call is cancelled closes
run_batch, which cancels its fetches).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator

import pytest
from enginekit import assert_engine_invariant, make_settings
from fetchpool.config import PoolLimits
from fetchpool.engine import Engine, FetchSpec
from fetchpool.engine.batch import run_batch
from support import AppServer, Certs

POOL = 10
AT_ONCE = 50
TOTAL = 2000
BOUND_S = 40.0  # the storm stops here even if TOTAL was not reached
SEED = 12


async def _one_fetch(engine: Engine, spec: FetchSpec, after: float) -> None:
    task = asyncio.create_task(engine.fetch(spec))
    await asyncio.sleep(after)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _one_batch(engine: Engine, spec: FetchSpec, after: float) -> None:
    async def items() -> AsyncIterator[tuple[int, FetchSpec]]:
        yield 0, spec

    async def consume() -> None:
        async for _ in run_batch(engine, items(), 1):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(after)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(
    ("how", "target", "route"),
    [("fetch", "h1", "direct"), ("batch", "h2", "direct"), ("fetch", "h2", "squid")],
)
async def test_a_storm_of_cancelled_fetches_loses_no_slot(
    how: str, target: str, route: str, make_engine: ..., proxy_url: ..., certs: Certs, app_server: AppServer
) -> None:
    limits = PoolLimits(max_connections=POOL, max_keepalive_connections=POOL, pool_timeout=3)
    engine: Engine = await make_engine(make_settings(certs, proxy=proxy_url(route), limits=limits))
    base = app_server.https_url if target == "h2" else app_server.http_url
    rng = random.Random(SEED)
    one = _one_fetch if how == "fetch" else _one_batch
    gate = asyncio.Semaphore(AT_ONCE)
    started = time.monotonic()
    launched = 0

    async def guarded(n: int, after: float) -> None:
        try:
            await one(engine, FetchSpec(url=f"{base}/delay?s=2&storm={n}", timeout=30), after)
        finally:
            gate.release()

    tasks = []
    while launched < TOTAL and time.monotonic() - started < BOUND_S:
        await gate.acquire()
        tasks.append(asyncio.create_task(guarded(launched, rng.uniform(0.02, 0.08))))
        launched += 1
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert launched >= 1000, f"only {launched} fetches in {BOUND_S} s"

    targets = [base] if route == "direct" else []
    what = f"{launched} cancelled fetches ({how}, {target}, {route})"
    await assert_engine_invariant(engine, targets, app_server, what)
