"""Many fetches with bounded concurrency, results in completion order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Coroutine
from typing import Any, TypeVar

from fetchpool.engine.fetcher import Engine
from fetchpool.engine.model import FetchSpec, Outcome
from fetchpool.errors import ErrorKind

K = TypeVar("K")
T = TypeVar("T")
_END = object()


def unavailable(spec: FetchSpec) -> Outcome:
    """The result of an item not started because the service is draining."""
    return Outcome(
        url=spec.url,
        error_kind=ErrorKind.UNAVAILABLE,
        error_message="not started: the server is shutting down; resubmit this item",
    )


async def run_batch(
    engine: Engine, items: AsyncIterable[tuple[K, FetchSpec]], concurrency: int
) -> AsyncIterator[tuple[K, Outcome]]:
    """Fetch every ``(key, spec)`` of ``items`` and yield ``(key, outcome)`` as each completes.

    At most ``concurrency`` items are in flight *or waiting to be consumed*, so a
    slow consumer (gRPC flow control) slows the intake instead of piling results
    up, and a 100,000-item batch holds at most ``concurrency`` results in memory.
    Every item yields exactly one outcome. Once the engine drains, items not yet
    started yield UNAVAILABLE outcomes at once (no longer waiting for a slot), and
    fetches the shutdown stops yield UNAVAILABLE too (see ``Engine.abort_in_flight``).
    Closing the generator cancels what is in flight and waits for those fetches to
    release their connections.
    """
    results: asyncio.Queue[Any] = asyncio.Queue()  # (key, outcome, holds a slot) or _END / an exception
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    counts = {"accepted": 0}

    async def fetch_one(key: K, spec: FetchSpec) -> None:
        try:
            outcome = await engine.fetch(spec)
        except Exception as exc:  # Engine.fetch reports failures in the outcome; this is a bug guard
            outcome = Outcome(url=spec.url, error_kind=ErrorKind.INTERNAL, error_message=repr(exc))
        results.put_nowait((key, outcome, True))

    async def take_slot() -> bool:
        """Wait for a slot; False (and no slot held) once the engine drains."""
        if engine.draining:
            return False
        if not slots.locked():
            await slots.acquire()
            return True
        acquire = asyncio.ensure_future(slots.acquire())
        drained = asyncio.ensure_future(engine.drained())
        try:
            await asyncio.wait((acquire, drained), return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
            if not acquire.done():
                acquire.cancel()
        if acquire.done() and not acquire.cancelled():
            if not engine.draining:
                return True
            slots.release()
        return False

    async def feed() -> None:
        async for key, spec in items:
            held = await take_slot()
            counts["accepted"] += 1
            if not held:
                results.put_nowait((key, unavailable(spec), False))
                continue
            task = asyncio.create_task(fetch_one(key, spec))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def fed(task: asyncio.Task[None]) -> None:
        results.put_nowait(_END if task.cancelled() or task.exception() is None else task.exception())

    feeder = asyncio.create_task(feed())
    feeder.add_done_callback(fed)
    yielded = 0
    feeding = True
    try:
        while feeding or yielded < counts["accepted"]:
            item = await results.get()
            if item is _END:
                feeding = False
                continue
            if isinstance(item, BaseException):
                raise item
            key, outcome, held = item
            yield key, outcome
            yielded += 1
            if held:
                slots.release()
    finally:
        feeder.cancel()
        pending = [feeder, *tasks]
        for task in pending:
            task.cancel()
        # asyncio.wait, not gather: if we are cancelled again meanwhile, gather would cancel
        # the fetches a second time, inside httpcore's own clean-up, and leak their streams.
        await asyncio.wait(pending)


async def cancel_once(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` in a task of its own that is cancelled at most once.

    A caller may be cancelled several times (a gRPC deadline, then the call's
    cancellation); httpcore releases a connection in clean-up code that must not be
    interrupted by a second cancellation, so the fetch is shielded and cancelled once.
    """
    task = asyncio.create_task(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        raise
