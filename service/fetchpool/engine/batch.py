"""Many fetches with bounded concurrency, results in completion order."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Coroutine
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


def out_of_time(spec: FetchSpec) -> Outcome:
    """The result of an item the call's deadline left no time to start."""
    return Outcome(
        url=spec.url,
        error_kind=ErrorKind.TIMEOUT,
        error_message="not started: the call's deadline was too close; give the call a longer deadline",
    )


def _bounded(engine: Engine, spec: FetchSpec, cutoff: float | None) -> tuple[FetchSpec, bool] | Outcome:
    """``spec`` with its total timeout shortened to end by ``cutoff`` (loop time) and whether it
    was; an outcome instead when no time is left. A spec whose own timeout is invalid is left
    as it is, for the engine to refuse (INVALID_ARGUMENT)."""
    if cutoff is None:
        return spec, False
    left = cutoff - asyncio.get_running_loop().time()
    if left <= 0:
        return out_of_time(spec)
    limits = engine.settings.timeouts
    own = limits.request if spec.timeout is None else spec.timeout
    if not 0 < own <= limits.max_request or own <= left:
        return spec, False
    return dataclasses.replace(spec, timeout=left), True


async def fetch_within(engine: Engine, spec: FetchSpec, cutoff: float | None) -> Outcome:
    """``engine.fetch(spec)``, ended by ``cutoff`` (loop time; None: no bound) at the latest: a
    fetch still running then is a TIMEOUT outcome that says the call's deadline stopped it."""
    bounded = _bounded(engine, spec, cutoff)
    if isinstance(bounded, Outcome):
        return bounded
    spec, shortened = bounded
    outcome = await engine.fetch(spec)
    if shortened and outcome.error_kind is ErrorKind.TIMEOUT and spec.timeout is not None \
            and outcome.timings.total >= spec.timeout * 0.99:
        outcome.error_message = (
            f"stopped after {outcome.timings.total:.3g} s so that its result reaches the caller before the "
            "call's deadline; give the call a longer deadline"
        )
    return outcome


class _Slots:
    """A batch's places for items in flight or unsent: a semaphore whose waiters can also all be
    turned away at once (the engine drains, the call's cutoff passes), with no task per waiter.

    Waiting through ``asyncio.wait`` on the semaphore and on the drain event took two tasks per
    item of a large batch (each waits for a place), and their scheduling."""

    __slots__ = ("_closed", "_free", "_waiters")

    def __init__(self, count: int) -> None:
        self._free = count
        self._waiters: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._closed = False

    async def take(self) -> bool:
        """True once a place is held; False when turned away (:meth:`close`) without one."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        if self._closed:
            return False
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()  # handed a place just as we gave up
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a place back: to the first waiter, if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self._free += 1

    def close(self) -> None:
        """Turn every waiter away, now and from now on (a free place is still taken)."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)


async def run_batch(
    engine: Engine, items: AsyncIterable[tuple[K, FetchSpec]], concurrency: int, cutoff: float | None = None
) -> AsyncIterator[tuple[K, Outcome]]:
    """Fetch every ``(key, spec)`` of ``items`` and yield ``(key, outcome)`` as each completes;
    :func:`run_batch_ready` one at a time (see there)."""
    # aclosing: closing this generator must close (cancel and await) the batch's fetches now.
    async with contextlib.aclosing(run_batch_ready(engine, items, concurrency, cutoff, most=1)) as lists:
        async for ready in lists:
            yield ready[0]


async def run_batch_ready(
    engine: Engine,
    items: AsyncIterable[tuple[K, FetchSpec]],
    concurrency: int,
    cutoff: float | None = None,
    most: int = 0,
) -> AsyncGenerator[list[tuple[K, Outcome]], None]:
    """Fetch every ``(key, spec)`` of ``items``; yield the ``(key, outcome)`` pairs that have
    completed, in completion order, as lists of every one ready (at most ``most``, 0: no bound).
    A list is never held back for more to complete: the first outcome is yielded as soon as it
    completes with those that completed meanwhile (while the consumer sent the last list).

    At most ``concurrency`` items are in flight *or waiting to be consumed* (a list is consumed
    when the consumer asks for the next), so a slow consumer (gRPC flow control) slows the
    intake instead of piling results up, and a 100,000-item batch holds at most
    ``concurrency`` results in memory.
    Every item yields exactly one outcome. Once the engine drains, items not yet
    started yield UNAVAILABLE outcomes at once (no longer waiting for a slot), and
    fetches the shutdown stops yield UNAVAILABLE too (see ``Engine.abort_in_flight``).
    Closing the generator cancels what is in flight and waits for those fetches to
    release their connections.

    ``cutoff`` (loop time, None: none) is when every fetch must have ended, so that its result
    can still reach the caller before the call's deadline: fetches are shortened to end by then
    (TIMEOUT outcomes), and items not started by then yield TIMEOUT outcomes at once.
    """
    results: asyncio.Queue[Any] = asyncio.Queue()  # (key, outcome, holds a slot) or _END / an exception
    slots = _Slots(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    counts = {"accepted": 0}
    loop = asyncio.get_running_loop()
    # Waiting items are turned away when the engine drains or the cutoff passes.
    drain = asyncio.ensure_future(engine.drained())
    drain.add_done_callback(lambda _: slots.close())
    deadline = loop.call_at(cutoff, slots.close) if cutoff is not None else None

    async def fetch_one(key: K, spec: FetchSpec) -> None:
        try:
            outcome = await fetch_within(engine, spec, cutoff)
        except Exception as exc:  # Engine.fetch reports failures in the outcome; this is a bug guard
            outcome = Outcome(url=spec.url, error_kind=ErrorKind.INTERNAL, error_message=repr(exc))
        results.put_nowait((key, outcome, True))

    async def take_slot(spec: FetchSpec) -> Outcome | None:
        """Wait for a slot: None once held; else the item's outcome (no slot held) when the
        engine drains (UNAVAILABLE) or the cutoff passes first (TIMEOUT)."""
        if engine.draining:
            return unavailable(spec)
        if await slots.take():
            if not engine.draining:
                return None
            slots.release()
        return unavailable(spec) if engine.draining else out_of_time(spec)

    async def feed() -> None:
        async for key, spec in items:
            refused = await take_slot(spec)
            counts["accepted"] += 1
            if refused is not None:
                results.put_nowait((key, refused, False))
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
            ready: list[tuple[K, Outcome]] = []
            held, failure = 0, None
            item = await results.get()
            while True:
                if item is _END:
                    feeding = False
                elif isinstance(item, BaseException):
                    failure = item
                    break
                else:
                    ready.append((item[0], item[1]))
                    held += item[2]
                if len(ready) == most or results.empty():
                    break
                item = results.get_nowait()
            if ready:
                yield ready
                yielded += len(ready)
                for _ in range(held):
                    slots.release()
            if failure is not None:
                raise failure
    finally:
        drain.cancel()
        if deadline is not None:
            deadline.cancel()
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
