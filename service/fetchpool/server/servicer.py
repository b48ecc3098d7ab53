"""The gRPC servicers: FetchService and PoolAdmin. Conversion only; the engine does the work."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterator

import grpc

from fetchpool.engine import Engine, FetchSpec
from fetchpool.engine.batch import cancel_once, run_batch
from fetchpool.errors import InvalidLimits
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


class FetchServicer(pb_grpc.FetchServiceServicer):
    """``fetchpool.v1.FetchService``. Fetch failures are per-item errors; call errors are
    INVALID_ARGUMENT (empty batch), RESOURCE_EXHAUSTED (batch over the maximum size),
    UNAVAILABLE (draining), DEADLINE_EXCEEDED and CANCELLED (from gRPC itself)."""

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
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)

    async def Fetch(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext) -> pb.FetchResult:
        await self._refuse_if_draining(context)
        with self._tracked():
            outcome = await cancel_once(self._engine.fetch(spec_from_proto(request)))
        return result_to_proto(outcome, request.id, 0)

    async def FetchMany(
        self, request: pb.FetchManyRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FetchResult]:
        await self._refuse_if_draining(context)
        settings = self._engine.settings.fetch
        count = len(request.requests)
        if count == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the batch is empty")
        if count > settings.max_batch_size:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the batch has {count} requests; the maximum is {settings.max_batch_size}",
            )
        concurrency = min(request.concurrency or settings.batch_concurrency, settings.max_batch_concurrency)

        async def items() -> AsyncIterator[tuple[tuple[int, str], FetchSpec]]:
            for index, item in enumerate(request.requests):
                yield (index, item.id), spec_from_proto(item)

        with self._tracked():
            async for (index, request_id), outcome in run_batch(self._engine, items(), concurrency):
                yield result_to_proto(outcome, request_id, index)

    async def FetchStream(
        self, request_iterator: AsyncIterable[pb.FetchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FetchResult]:
        await self._refuse_if_draining(context)

        async def items() -> AsyncIterator[tuple[tuple[int, str], FetchSpec]]:
            index = 0
            async for item in request_iterator:
                yield (index, item.id), spec_from_proto(item)
                index += 1

        concurrency = self._engine.settings.fetch.batch_concurrency
        with self._tracked():
            async for (index, request_id), outcome in run_batch(self._engine, items(), concurrency):
                yield result_to_proto(outcome, request_id, index)


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
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no pool named {request.pool!r}")
        return self._limits()

    async def GetPoolStats(
        self, request: pb.GetPoolStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPoolStatsResponse:
        response = pb.GetPoolStatsResponse(pools=[stats_to_proto(s) for s in self._engine.snapshots()])
        response.time.GetCurrentTime()
        return response
