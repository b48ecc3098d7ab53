"""FetchClient against a server older than the packed RPCs: a real grpcio server that knows only
FetchMany (no FetchManyPacked, so gRPC itself answers UNIMPLEMENTED, "Method not found")."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from fetchpool.client import FetchClient
from fetchpool.v1 import fetch_pb2 as pb


class _Methods(grpc.aio.ServerInterceptor):
    """Records the method of every call, also of those the server does not know."""

    def __init__(self) -> None:
        self.called: list[str] = []

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        self.called.append(details.method.rpartition("/")[2])
        return await continuation(details)


async def test_fetch_many_falls_back_to_fetch_many_on_a_server_without_the_packed_rpcs() -> None:
    calls: list[int] = []

    async def fetch_many(request: pb.FetchManyRequest, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[pb.FetchResult]:
        calls.append(len(request.requests))
        for index, item in enumerate(request.requests):
            yield pb.FetchResult(id=item.id, index=index, url=item.url, status_code=200)

    methods = _Methods()
    server = grpc.aio.server(interceptors=[methods])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("fetchpool.v1.FetchService", {
        "FetchMany": grpc.unary_stream_rpc_method_handler(
            fetch_many, request_deserializer=pb.FetchManyRequest.FromString,
            response_serializer=pb.FetchResult.SerializeToString),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with FetchClient(f"127.0.0.1:{port}", timeout=10) as client:
            first = [r.url async for r in client.fetch_many(["http://a.test/", "http://b.test/"])]
            second = [r.url async for r in client.fetch_many(["http://c.test/"])]
    finally:
        await server.stop(None)
    assert first == ["http://a.test/", "http://b.test/"] and second == ["http://c.test/"]
    assert calls == [2, 1]  # each batch reached the old RPC once
    assert methods.called == ["FetchManyPacked", "FetchMany", "FetchMany"]
