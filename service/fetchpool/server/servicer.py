"""The gRPC servicers: FetchService and PoolAdmin. Conversion only; the engine does the work.

Every fetch of a call ends :func:`deadline_margin` before the call's deadline, so that its result
(a TIMEOUT one if it had to be stopped) still reaches the caller. Results over the caller's
message size go in parts (``server.parts``); call errors carry details (``server.status``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from typing import NamedTuple

import grpc

from fetchpool.engine import Engine, FetchSpec, Outcome
from fetchpool.engine.batch import cancel_once, fetch_within, run_batch_ready
from fetchpool.errors import InvalidLimits
from fetchpool.server import parts, status
from fetchpool.server.convert import (
    limit_changes,
    limits_to_proto,
    result_to_proto,
    spec_from_proto,
    stats_to_proto,
)
from fetchpool.v1 import fetch_pb2 as pb
from fetchpool.v1 import fetch_pb2_grpc as pb_grpc

DRAINING = "the server is shutting down; retry on another replica"


def deadline_margin(remaining: float) -> float:
    """Seconds before a call's deadline by which its fetches end: a tenth of the time the call
    had, within [0.05, 1] s (room to send the last results, a network round trip included)."""
    return min(1.0, max(0.05, remaining / 10))


class _Item(NamedTuple):
    """What the servicer keeps of a request while the engine fetches it."""

    position: int
    id: str
    include_text: bool
    message_limit: int


def _converted(ready: list[tuple[_Item, Outcome]]) -> list[tuple[pb.FetchResult, int]]:
    """Results as messages, each with its caller's message limit."""
    return [(result_to_proto(outcome, item.id, item.position, include_text=item.include_text), item.message_limit)
            for item, outcome in ready]


class FetchServicer(pb_grpc.FetchServiceServicer):
    """``fetchpool.v1.FetchService``. Fetch failures are per-item errors; call errors are
    INVALID_ARGUMENT (empty batch), RESOURCE_EXHAUSTED (batch over the maximum size),
    UNAVAILABLE (draining), and CANCELLED or DEADLINE_EXCEEDED from gRPC itself (a deadline
    too short to send anything)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._calls = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        self._calls += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._calls -= 1
            if not self._calls:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the fetch calls in flight to end; True if they did."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def _refuse_if_draining(self, context: grpc.aio.ServicerContext) -> None:
        if self._engine.draining:
            await status.abort(context, "DRAINING", DRAINING)

    @staticmethod
    def _cutoff(context: grpc.aio.ServicerContext) -> float | None:
        """Loop time by which the call's fetches must end; None without a deadline."""
        remaining = context.time_remaining()
        if remaining is None:
            return None
        return asyncio.get_running_loop().time() + remaining - deadline_margin(remaining)

    def _item(self, request: pb.FetchRequest, index: int, default_limit: int = 0) -> _Item:
        limit = parts.message_limit(request.max_message_bytes or default_limit,
                                    self._engine.settings.server.max_message_bytes)
        return _Item(index, request.id, request.include_text, limit)

    async def Fetch(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext) -> pb.FetchResult:
        await self._refuse_if_draining(context)
        item = self._item(request, 0)
        with self._tracked():
            outcome = await cancel_once(fetch_within(self._engine, spec_from_proto(request), self._cutoff(context)))
        result = result_to_proto(outcome, item.id, item.position, include_text=item.include_text)
        return parts.too_large_for_fetch(result, item.message_limit)

    async def _single(
        self, items: AsyncIterable[tuple[_Item, FetchSpec]], concurrency: int, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FetchResult]:
        """The batch's results as they complete, a message each (a large one in parts)."""
        with self._tracked():
            async for ready in run_batch_ready(self._engine, items, concurrency, self._cutoff(context), most=1):
                for result, limit in _converted(ready):
                    for message in parts.split(result, limit):
                        yield message

    async def _packed(
        self, items: AsyncIterable[tuple[_Item, FetchSpec]], concurrency: int, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FetchResults]:
        """The batch's results as they complete, those ready together packed (``parts.pack``)."""
        with self._tracked():
            async for ready in run_batch_ready(self._engine, items, concurrency, self._cutoff(context)):
                for message in parts.pack(_converted(ready)):
                    yield message

    async def _many(
        self, request: pb.FetchManyRequest, context: grpc.aio.ServicerContext
    ) -> tuple[AsyncIterator[tuple[_Item, FetchSpec]], int]:
        """A FetchMany request's items and concurrency; aborts the call for an empty or too large
        batch, or while draining."""
        await self._refuse_if_draining(context)
        settings = self._engine.settings.fetch
        count = len(request.requests)
        if count == 0:
            await status.abort(context, "EMPTY_BATCH", "the batch is empty",
                               violations=[("requests", "give at least one request")])
        if count > settings.max_batch_size:
            await status.abort(
                context, "BATCH_TOO_LARGE",
                f"the batch has {count} requests; the maximum is {settings.max_batch_size}: split it",
                metadata={"batch_size": count, "max_batch_size": settings.max_batch_size},
            )
        concurrency = min(request.concurrency or settings.batch_concurrency, settings.max_batch_concurrency)

        async def items() -> AsyncIterator[tuple[_Item, FetchSpec]]:
            for index, item in enumerate(request.requests):
                yield self._item(item, index, request.max_message_bytes), spec_from_proto(item)

        return items(), concurrency

    async def _stream(
        self, request_iterator: AsyncIterable[pb.FetchRequest] | AsyncIterable[pb.FetchRequests], packed: bool
    ) -> AsyncIterator[tuple[_Item, FetchSpec]]:
        """A FetchStream(Packed) call's items, ``index`` counting requests (across messages)."""
        index = 0
        async for message in request_iterator:
            for item in message.requests if packed else (message,):
                yield self._item(item, index), spec_from_proto(item)
                index += 1

    async def FetchMany(
        self, request: pb.FetchManyRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FetchResult]:
        items, concurrency = await self._many(request, context)
        async for message in self._single(items, concurrency, context):
            yield message

    async def FetchManyPacked(
        self, request: pb.FetchManyRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FetchResults]:
        items, concurrency = await self._many(request, context)
        async for message in self._packed(items, concurrency, context):
            yield message

    async def FetchStream(
        self, request_iterator: AsyncIterable[pb.FetchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FetchResult]:
        await self._refuse_if_draining(context)
        concurrency = self._engine.settings.fetch.batch_concurrency
        async for message in self._single(self._stream(request_iterator, packed=False), concurrency, context):
            yield message

    async def FetchStreamPacked(
        self, request_iterator: AsyncIterable[pb.FetchRequests], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FetchResults]:
        await self._refuse_if_draining(context)
        concurrency = self._engine.settings.fetch.batch_concurrency
        async for message in self._packed(self._stream(request_iterator, packed=True), concurrency, context):
            yield message


class PoolAdminServicer(pb_grpc.PoolAdminServicer):
    """``fetchpool.v1.PoolAdmin``: limits and stats of this process's pools."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _limits(self) -> pb.GetPoolLimitsResponse:
        return pb.GetPoolLimitsResponse(pools={p.name: limits_to_proto(p.limits) for p in self._engine.pools})

    async def GetPoolLimits(
        self, request: pb.GetPoolLimitsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPoolLimitsResponse:
        return self._limits()

    async def SetPoolLimits(
        self, request: pb.SetPoolLimitsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPoolLimitsResponse:
        try:
            self._engine.set_limits(limit_changes(request.limits), request.pool)
        except InvalidLimits as exc:
            violations = [(f"limits.{name}", text) for name, text in exc.fields] or [("limits", str(exc))]
            await status.abort(context, "INVALID_LIMITS", str(exc), violations=violations)
        except KeyError:
            names = ", ".join(p.name for p in self._engine.pools)
            await status.abort(context, "POOL_NOT_FOUND", f"no pool named {request.pool!r} (pools: {names})",
                               metadata={"pool": request.pool})
        return self._limits()

    async def GetPoolStats(
        self, request: pb.GetPoolStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPoolStatsResponse:
        response = pb.GetPoolStatsResponse(pools=[stats_to_proto(s) for s in self._engine.snapshots()])
        response.time.GetCurrentTime()
        return response
