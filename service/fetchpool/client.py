"""A small typed async client for fetchpool (the CLI is built on it).

    async with FetchClient("127.0.0.1:50051") as client:
        result = await client.fetch("https://example.org/")
        async for result in client.fetch_many(["https://a/", "https://b/"]):
            print(result.index, result.status_code, len(result.body))

Results are ``fetchpool.v1.FetchResult`` messages (typed by the generated
``.pyi``), always whole: a large result that the server sends in parts (see
``FetchResult.part``) is joined again before it is yielded (:func:`reassemble`, usable on
any stream of results). RPC failures raise ``grpc.aio.AioRpcError``; their
``google.rpc.Status`` details are read with ``grpc_status.rpc_status.from_call(error)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from datetime import timedelta
from typing import Any, NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fetchpool.v1 import fetch_pb2 as pb
from fetchpool.v1 import fetch_pb2_grpc as pb_grpc

__all__ = ["FetchClient", "make_request", "pack_requests", "reassemble", "unpack"]

RequestLike = pb.FetchRequest | str
#: FetchStreamPacked: the most bytes of requests one message carries (a larger request goes
#: alone): hundreds of typical requests, far below the server's receive limit (--max-message-bytes,
#: 64 MiB by default).
PACKED_REQUEST_BYTES = 64 * 1024
#: FetchStreamPacked: the most requests read ahead of the call from an async iterable.
READ_AHEAD = 1024
#: What ``FetchClient.fetch`` asks the server for when a request does not say (the server caps it
#: at its --max-message-bytes): this client's channel accepts messages of any size.
LARGEST_MESSAGE = 2**31 - 1


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
    keep_cookies: bool = False,
    include_text: bool = False,
    max_message_bytes: int = 0,
) -> pb.FetchRequest:
    """A FetchRequest; ``timeout`` in seconds, ``max_body_bytes`` and ``max_message_bytes`` in
    bytes (0: the server's defaults). See fetch.proto for each field."""
    request = pb.FetchRequest(
        id=id or url,
        url=url,
        method=method,
        headers=[pb.Header(name=n, value=v) for n, v in headers],
        body=body,
        max_body_bytes=max_body_bytes,
        session_key=session_key,
        keep_cookies=keep_cookies,
        include_text=include_text,
        max_message_bytes=max_message_bytes,
    )
    if timeout is not None:
        request.timeout.FromTimedelta(timedelta(seconds=timeout))
    if follow_redirects is not None:
        request.follow_redirects = follow_redirects
    return request


def _request(item: RequestLike) -> pb.FetchRequest:
    return make_request(item) if isinstance(item, str) else item


async def _each_request(requests: AsyncIterable[RequestLike] | Iterable[RequestLike]) -> AsyncIterator[pb.FetchRequest]:
    if isinstance(requests, AsyncIterable):
        async for item in requests:
            yield _request(item)
    else:
        for item in requests:
            yield _request(item)


async def pack_requests(
    requests: AsyncIterable[RequestLike] | Iterable[RequestLike], most_bytes: int = PACKED_REQUEST_BYTES
) -> AsyncIterator[pb.FetchRequests]:
    """``requests`` as FetchRequests messages, in order, each ending with the request that takes
    it to ``most_bytes`` or beyond. From an async iterable, a message carries the requests that
    were ready when the last one was sent (a task reads ahead, up to ``READ_AHEAD`` requests),
    never waiting for more; from a plain iterable, as many as that bound allows."""
    if not isinstance(requests, AsyncIterable):
        batch: list[pb.FetchRequest] = []
        size = 0
        for item in requests:
            request = _request(item)
            batch.append(request)
            size += request.ByteSize() + 6  # with its tag and length prefix
            if size >= most_bytes:
                yield pb.FetchRequests(requests=batch)
                batch, size = [], 0
        if batch:
            yield pb.FetchRequests(requests=batch)
        return
    ready: asyncio.Queue[pb.FetchRequest | _Ended] = asyncio.Queue(READ_AHEAD)

    async def read() -> None:
        try:
            async for item in requests:
                await ready.put(_request(item))
        except Exception as exc:  # the caller's iterator failed: the call fails with it
            await ready.put(_Ended(exc))
        else:
            await ready.put(_Ended(None))

    reader = asyncio.create_task(read())
    try:
        while True:
            got = await ready.get()
            batch, size = [], 0
            while not isinstance(got, _Ended):
                batch.append(got)
                size += got.ByteSize() + 6
                if size >= most_bytes or ready.empty():
                    break
                got = ready.get_nowait()
            if batch:
                yield pb.FetchRequests(requests=batch)
            if isinstance(got, _Ended):
                if got.error is not None:
                    raise got.error
                return
    finally:
        reader.cancel()


class _Ended(NamedTuple):
    """The end of the caller's requests: ``error`` if its iterator raised."""

    error: Exception | None


async def unpack(messages: AsyncIterable[pb.FetchResults]) -> AsyncIterator[pb.FetchResult]:
    """The results of a FetchManyPacked/FetchStreamPacked message stream, one by one, in order
    (parts of a large result still apart: see :func:`reassemble`)."""
    async for message in messages:
        for result in message.results:
            yield result


async def reassemble(messages: AsyncIterable[pb.FetchResult]) -> AsyncIterator[pb.FetchResult]:
    """The results of a FetchMany/FetchStream message stream, each whole: the parts of a large
    result (``part`` 0, 1, ... up to ``more_parts`` false, consecutive) joined into part 0.

    Raises ValueError for a continuation that does not follow its result's part 0.
    """
    head: pb.FetchResult | None = None
    bodies: list[bytes] = []
    texts: list[str] = []
    async for message in messages:
        if message.part == 0:
            head, bodies, texts = message, [message.body], [message.text]
        elif head is None or message.index != head.index or message.part != len(bodies):
            raise ValueError(f"part {message.part} of result {message.index} arrived out of order")
        else:
            bodies.append(message.body)
            texts.append(message.text)
        if not message.more_parts:
            assert head is not None
            if len(bodies) > 1:
                head.body, head.text, head.more_parts = b"".join(bodies), "".join(texts), False
            yield head
            head = None


class FetchClient:
    """A channel to one fetchpool target (``host:port``, or ``dns:///name:port`` with
    ``options=[("grpc.lb_policy_name", "round_robin")]`` to spread calls over a
    headless Service's pods).

    ``credentials`` makes a TLS channel; ``token`` sends ``authorization: Bearer``.
    ``timeout`` is the default per-call deadline in seconds (None: no deadline).
    ``packed`` (default) makes ``fetch_many`` and ``fetch_stream`` call FetchManyPacked and
    FetchStreamPacked, which carry several results per message (less of the service's CPU per
    fetch, see fetch.proto); False calls FetchMany and FetchStream, for a server older than those
    (it answers UNIMPLEMENTED, which ``fetch_many`` handles by itself; ``fetch_stream`` cannot
    send its requests again). Either way they yield the same results, one by one.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
        packed: bool = True,
    ) -> None:
        opts = [("grpc.max_receive_message_length", -1), *options]
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._packed = packed
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

    def connected(self) -> bool:
        """Whether the channel holds a working gRPC connection to the target (READY): after a
        call that failed, False says nothing answered as gRPC there."""
        return self._channel.get_state() == grpc.ChannelConnectivity.READY

    async def fetch(self, request: RequestLike, *, timeout: float | None = None) -> pb.FetchResult:
        """Fetch one URL (a string or a FetchRequest). Unless the request says otherwise, the
        result may be as large as the server sends (its --max-message-bytes); a larger one
        comes back with a TOO_LARGE error (``fetch_many`` has no such limit)."""
        message = _request(request)
        if not message.max_message_bytes:
            asked = pb.FetchRequest()
            asked.CopyFrom(message)
            asked.max_message_bytes = LARGEST_MESSAGE
            message = asked
        return await self._fetch.Fetch(message, **self._call(timeout))

    async def fetch_many(
        self, requests: Iterable[RequestLike], *, concurrency: int = 0, timeout: float | None = None
    ) -> AsyncIterator[pb.FetchResult]:
        """Fetch a batch; yields results in completion order (see ``result.index``).

        A server older than FetchManyPacked answers it UNIMPLEMENTED before any result: the batch
        is then sent as FetchMany, and this client keeps to the one-result RPCs from then on."""
        message = pb.FetchManyRequest(requests=[_request(r) for r in requests], concurrency=concurrency)
        if self._packed:
            packed = self._fetch.FetchManyPacked(message, **self._call(timeout))
            answered = False
            try:
                async for result in reassemble(unpack(packed)):
                    answered = True
                    yield result
                return
            except grpc.aio.AioRpcError as exc:
                if answered or exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._packed = False
            finally:
                packed.cancel()
        call = self._fetch.FetchMany(message, **self._call(timeout))
        try:
            async for result in reassemble(call):
                yield result
        finally:
            call.cancel()

    async def fetch_stream(
        self, requests: AsyncIterable[RequestLike] | Iterable[RequestLike], *, timeout: float | None = None
    ) -> AsyncIterator[pb.FetchResult]:
        """Stream requests in while results stream out (completion order). Packed, each message
        carries the requests ready when it is sent (see :func:`pack_requests`)."""
        if self._packed:
            call = self._fetch.FetchStreamPacked(pack_requests(requests), **self._call(timeout))
        else:
            call = self._fetch.FetchStream(_each_request(requests), **self._call(timeout))
        try:
            async for result in reassemble(unpack(call) if self._packed else call):
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
