"""fetchpool.client.pack_requests: the requests of FetchStreamPacked, packed as they are ready."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fetchpool.client import make_request, pack_requests
from fetchpool.v1 import fetch_pb2 as pb


async def _messages(requests: object, **kw: int) -> list[list[str]]:
    return [[r.url async for r in _each(m)] async for m in pack_requests(requests, **kw)]  # type: ignore[arg-type]


async def _each(message: pb.FetchRequests) -> AsyncIterator[pb.FetchRequest]:
    for request in message.requests:
        yield request


async def test_a_list_goes_in_messages_that_end_at_the_byte_bound() -> None:
    urls = [f"http://a.test/{i:03}" for i in range(10)]
    size = make_request(urls[0]).ByteSize() + 6
    messages = await _messages(urls, most_bytes=3 * size)
    assert messages == [urls[0:3], urls[3:6], urls[6:9], urls[9:]]


async def test_an_async_source_sends_what_is_ready_and_never_waits_for_more() -> None:
    more = asyncio.Event()

    async def source() -> AsyncIterator[str]:
        for i in range(3):
            yield f"http://a.test/{i}"
        await more.wait()
        for i in range(3, 5):
            yield f"http://a.test/{i}"

    got = []
    async with asyncio.timeout(5):
        async for message in pack_requests(source()):
            got.append([r.url for r in message.requests])
            more.set()  # the next two only after the first message went
    assert got == [[f"http://a.test/{i}" for i in range(3)], [f"http://a.test/{i}" for i in range(3, 5)]]


async def test_a_failing_source_fails_the_packing_after_what_it_gave() -> None:
    async def source() -> AsyncIterator[str]:
        yield "http://a.test/0"
        raise RuntimeError("the caller's source broke")

    got = []
    with pytest.raises(RuntimeError, match="source broke"):
        async for message in pack_requests(source()):
            got.append([r.url for r in message.requests])
    assert got == [["http://a.test/0"]]
