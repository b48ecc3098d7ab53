"""A small typed async client for fetchpool (the CLI is built on it).

    async with FetchClient("127.0.0.1:50051") as client:
        result = await client.fetch("https://example.org/")
        async for result in client.fetch_many(["https://a/", "https://b/"]):
            print(result.index, result.status_code, len(result.body))

Results are ``fetchpool.v1.FetchResult`` messages (typed by the generated
``.pyi``). RPC failures raise ``grpc.aio.AioRpcError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fetchpool.v1 import fetch_pb2 as pb
from fetchpool.v1 import fetch_pb2_grpc as pb_grpc

__all__ = ["FetchClient", "make_request"]

RequestLike = pb.FetchRequest | str


def make_request(
    url: str,
    *,
    id: str = "",
    method: str = "",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    timeout: float | None = None,
    follow_redirects: bool | None = None,
    max_body_bytes: int = 0,
    session_key: str = "",
) -> pb.FetchRequest:
    """A FetchRequest; ``timeout`` in seconds, ``max_body_bytes`` in bytes (0: server default)."""
    request = pb.FetchRequest(
        id=id or url,
        url=url,
        method=method,
        headers=[pb.Header(name=n, value=v) for n, v in headers],
        body=body,
        max_body_bytes=max_body_bytes,
        session_key=session_key,
    )
    if timeout is not None:
        request.timeout.FromTimedelta(timedelta(seconds=timeout))
    if follow_redirects is not None:
        request.follow_redirects = follow_redirects
    return request


def _request(item: RequestLike) -> pb.FetchRequest:
    return make_request(item) if isinstance(item, str) else item


class FetchClient:
    """A channel to one fetchpool target (``host:port``, or ``dns:///name:port`` with
    ``options=[("grpc.lb_policy_name", "round_robin")]`` to spread calls over a
    headless Service's pods).

    ``credentials`` makes a TLS channel; ``token`` sends ``authorization: Bearer``.
    ``timeout`` is the default per-call deadline in seconds (None: no deadline).
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        opts = [("grpc.max_receive_message_length", -1), *options]
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._fetch = pb_grpc.FetchServiceStub(self._channel)
        self._admin = pb_grpc.PoolAdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> FetchClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (cancels calls still running)."""
        await self._channel.close(grace=None)

    def _call(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": timeout if timeout is not None else self._timeout, "metadata": self._metadata}

    async def fetch(self, request: RequestLike, *, timeout: float | None = None) -> pb.FetchResult:
        """Fetch one URL (a string or a FetchRequest)."""
        return await self._fetch.Fetch(_request(request), **self._call(timeout))

    async def fetch_many(
        self, requests: Iterable[RequestLike], *, concurrency: int = 0, timeout: float | None = None
    ) -> AsyncIterator[pb.FetchResult]:
        """Fetch a batch; yields results in completion order (see ``result.index``)."""
        message = pb.FetchManyRequest(requests=[_request(r) for r in requests], concurrency=concurrency)
        call = self._fetch.FetchMany(message, **self._call(timeout))
        try:
            async for result in call:
                yield result
        finally:
            call.cancel()

    async def fetch_stream(
        self, requests: AsyncIterable[RequestLike] | Iterable[RequestLike], *, timeout: float | None = None
    ) -> AsyncIterator[pb.FetchResult]:
        """Stream requests in while results stream out (completion order)."""

        async def outgoing() -> AsyncIterator[pb.FetchRequest]:
            if isinstance(requests, AsyncIterable):
                async for item in requests:
                    yield _request(item)
            else:
                for item in requests:
                    yield _request(item)

        call = self._fetch.FetchStream(outgoing(), **self._call(timeout))
        try:
            async for result in call:
                yield result
        finally:
            call.cancel()

    async def pool_stats(self) -> pb.GetPoolStatsResponse:
        """Stats of every pool of the process behind this channel."""
        return await self._admin.GetPoolStats(pb.GetPoolStatsRequest(), **self._call(None))

    async def get_limits(self) -> pb.GetPoolLimitsResponse:
        """Limits in force, per pool."""
        return await self._admin.GetPoolLimits(pb.GetPoolLimitsRequest(), **self._call(None))

    async def set_limits(self, limits: pb.PoolLimits, *, pool: str = "") -> pb.GetPoolLimitsResponse:
        """Change limits live (unset fields keep their value); INVALID_ARGUMENT for bad ones."""
        return await self._admin.SetPoolLimits(pb.SetPoolLimitsRequest(pool=pool, limits=limits), **self._call(None))

    async def health(self, service: str = "") -> int:
        """The health status (``health_pb2.HealthCheckResponse.SERVING`` == 1, ...)."""
        response = await self._health.Check(health_pb2.HealthCheckRequest(service=service), **self._call(None))
        return int(response.status)
