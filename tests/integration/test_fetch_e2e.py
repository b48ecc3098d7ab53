"""End to end: a real gRPC client, a real ``fetchpool serve`` process, real nginx / tinyproxy / hypercorn."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from fetchpool.client import FetchClient, make_request
from fetchpool.v1 import fetch_pb2 as pb
from fetchpool.v1 import fetch_pb2_grpc as pb_grpc
from support import AppServer, Nginx, Tinyproxy
from support.coalesce import coalescing_relay
from support.fetchpool_service import FetchpoolService
from support.transports import every_transport  # noqa: F401  (every test here runs once per transport)

Kind = pb.FetchError


async def _collect(client: FetchClient, requests: list[pb.FetchRequest], **kw: int) -> list[pb.FetchResult]:
    return [r async for r in client.fetch_many(requests, **kw)]


async def _wait_idle(client: FetchClient, timeout: float = 10.0) -> pb.PoolStats:
    """Poll the pool stats until nothing is checked out (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = (await client.pool_stats()).pools[0]
        if stats.requests_active == 0 and stats.connections_active == 0 and stats.http2_streams == 0:
            return stats
        assert time.monotonic() < deadline, f"pool still busy: {stats}"
        await asyncio.sleep(0.1)


async def test_fetch_over_http2_returns_the_page(service: FetchpoolService, nginx: Nginx, site_root: Path) -> None:
    since = nginx.log_offset()
    async with FetchClient(service.target) as client:
        result = await client.fetch(make_request(f"{nginx.https_url}/small.html?t=h2", id="one"))
    assert not result.HasField("error"), result.error
    assert (result.id, result.status_code, result.http_version) == ("one", 200, "HTTP/2")
    assert result.body == (site_root / "small.html").read_bytes()
    assert result.timings.total_seconds >= result.timings.ttfb_seconds > 0
    [entry] = [e for e in nginx.access_log(since, min_entries=1) if e["request_uri"] == "/small.html?t=h2"]
    assert entry["server_protocol"] == "HTTP/2.0"


async def test_through_the_proxy_uses_connect_and_http2(
    start_service: ..., tinyproxy: Tinyproxy, nginx: Nginx, site_root: Path
) -> None:
    service = start_service("--proxy", tinyproxy.url)
    since = tinyproxy.log_offset()
    async with FetchClient(service.target) as client:
        result = await client.fetch(f"{nginx.https_url}/large.html?via=proxy")
        stats = await client.pool_stats()
    assert not result.HasField("error"), result.error
    assert result.http_version == "HTTP/2" and result.body == (site_root / "large.html").read_bytes()
    assert result.timings.proxy_connect_seconds > 0 and result.timings.tls_seconds > 0
    assert f"CONNECT 127.0.0.1:{nginx.https_port}" in tinyproxy.log_text(since)
    assert [p.pool for p in stats.pools] == [tinyproxy.url] and "@" not in tinyproxy.url


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_200_requests_with_a_pool_of_10_open_at_most_10_connections(
    start_service: ..., nginx: Nginx, scheme: str
) -> None:
    service = start_service("--max-connections", "10")
    base = nginx.http_url if scheme == "http" else nginx.https_url
    port = nginx.http_port if scheme == "http" else nginx.https_port
    since = nginx.log_offset()
    async with FetchClient(service.target) as client:
        requests = [make_request(f"{base}/small.html?reuse={i}", id=str(i)) for i in range(200)]
        results = await _collect(client, requests, concurrency=50)
        stats = await _wait_idle(client)
    assert sorted(r.index for r in results) == list(range(200))
    assert all(r.status_code == 200 and not r.HasField("error") for r in results)
    connections = nginx.distinct_connections(since, min_entries=200, port=port)
    assert 1 <= len(connections) <= 10
    assert stats.connections_created_total == len(connections)
    assert stats.requests_total == 200 and stats.reuse_ratio >= (200 - 10) / 200
    assert sum(r.connection_reused for r in results) >= 190


async def test_results_stream_in_completion_order(service: FetchpoolService, app_server: AppServer) -> None:
    requests = [make_request(f"{app_server.http_url}/delay?s=1.5", id="slow")]
    requests += [make_request(f"{app_server.http_url}/echo?n={i}", id=f"fast{i}") for i in range(5)]
    async with FetchClient(service.target) as client:
        results = await _collect(client, requests)
    assert [r.id for r in results][-1] == "slow"
    assert {r.id: r.index for r in results} == {req.id: i for i, req in enumerate(requests)}
    assert all(r.status_code == 200 for r in results)


async def test_a_bad_item_fails_alone_with_its_kind(service: FetchpoolService, nginx: Nginx) -> None:
    cases = {
        "good": (f"{nginx.https_url}/small.html", 0),
        "dns": ("http://no-such-host.invalid/", Kind.DNS),
        "refused": ("http://127.0.0.1:1/", Kind.CONNECT),
        "invalid": ("http://exa mple.com:99999/", Kind.INVALID_URL),
        "relative": ("/just/a/path", Kind.INVALID_URL),
        "scheme": ("ftp://127.0.0.1/file", Kind.INVALID_URL),
        "empty": ("", Kind.INVALID_URL),
        "method": (f"{nginx.https_url}/small.html", Kind.INVALID_ARGUMENT),
        "negative-timeout": (f"{nginx.https_url}/small.html", Kind.INVALID_ARGUMENT),
        "absurd-timeout": (f"{nginx.https_url}/small.html", Kind.INVALID_ARGUMENT),
        "too-large": (f"{nginx.https_url}/large.html", Kind.TOO_LARGE),
        "bad-header": (f"{nginx.https_url}/small.html", Kind.INVALID_ARGUMENT),
    }
    requests = []
    for name, (url, _) in cases.items():
        request = make_request(url, id=name, max_body_bytes=1000 if name == "too-large" else 0)
        if name == "method":
            request.method = "GE T"
        if name == "negative-timeout":
            request.timeout.seconds = -5
        if name == "absurd-timeout":
            request.timeout.seconds = 10**9
        if name == "bad-header":
            request.headers.add(name="X-Bad", value="a\r\nInjected: yes")
        requests.append(request)
    async with FetchClient(service.target) as client:
        results = {r.id: r for r in await _collect(client, requests)}
        assert await client.health() == 1
    assert set(results) == set(cases)
    for name, (_, kind) in cases.items():
        assert results[name].error.kind == kind, (name, results[name].error)
        assert kind == 0 or results[name].error.message
    assert results["good"].status_code == 200


async def test_fetch_stream_answers_while_the_caller_still_sends(service: FetchpoolService, nginx: Nginx) -> None:
    first_answer = asyncio.Event()

    async def requests() -> AsyncIterator[pb.FetchRequest]:
        yield make_request(f"{nginx.https_url}/small.html?s=0", id="0")
        # Only go on once a result came back: a half-duplex server would hang here.
        await asyncio.wait_for(first_answer.wait(), 10)
        for i in range(1, 20):
            yield make_request(f"{nginx.https_url}/small.html?s={i}", id=str(i))

    seen = []
    async with FetchClient(service.target) as client:
        async for result in client.fetch_stream(requests()):
            first_answer.set()
            seen.append((result.id, result.index, result.status_code))
    assert sorted(seen) == sorted((str(i), i, 200) for i in range(20))


async def test_cancelling_mid_batch_releases_every_connection(
    service: FetchpoolService, app_server: AppServer, nginx: Nginx
) -> None:
    # "quick" goes to another origin: hypercorn sometimes holds a short HTTP/2 response
    # behind long ones on the same connection (plain httpx sees that too).
    requests = [make_request(f"{nginx.https_url}/small.html?quick", id="quick")]
    requests += [make_request(f"{app_server.https_url}/delay?s=8&n={i}", id=str(i)) for i in range(20)]
    requests += [make_request(f"{app_server.http_url}/delay?s=8&h1={i}", id=f"h1-{i}") for i in range(20)]
    async with FetchClient(service.target) as client:
        stream = client.fetch_many(requests, concurrency=40)
        first = await anext(stream)
        assert first.id == "quick"
        busy = (await client.pool_stats()).pools[0]
        assert busy.requests_active > 0
        await stream.aclose()  # cancels the call
        stats = await _wait_idle(client)
    assert stats.requests_waiting == 0


async def test_results_that_complete_together_share_packed_messages(
    service: FetchpoolService, app_server: AppServer
) -> None:
    # 50 fetches in flight at once over one HTTP/2 connection, each answered after 0.5 s, the
    # answers handed to the service in one burst (a loaded machine would spread them over tens of
    # milliseconds, and a fast service writes each result before the next arrives): they complete
    # together. tests/engine/test_engine_batch_ready.py pins down which results go together.
    async with coalescing_relay(("127.0.0.1", app_server.https_port)) as port:
        requests = [make_request(f"https://127.0.0.1:{port}/delay?s=0.5&n={i}", id=str(i)) for i in range(50)]
        batch = pb.FetchManyRequest(requests=requests, concurrency=50)
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub = pb_grpc.FetchServiceStub(channel)
            packed = [message async for message in stub.FetchManyPacked(batch, timeout=30)]
            single = [message async for message in stub.FetchMany(batch, timeout=30)]
    results = [result for message in packed for result in message.results]
    assert sorted(r.index for r in results) == sorted(r.index for r in single) == list(range(50))
    assert all(r.status_code == 200 and r.id == str(r.index) and r.http_version == "HTTP/2"
               for r in [*results, *single])
    assert len(packed) <= 25, f"50 results in {len(packed)} messages: {[len(m.results) for m in packed]}"


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one-per-message"])
async def test_whole_call_errors(start_service: ..., packed: bool) -> None:
    service = start_service("--max-batch-size", "3")
    async with FetchClient(service.target, packed=packed) as client:
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await _collect(client, [])
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as too_many:
            await _collect(client, ["http://127.0.0.1:1/"] * 4)
        assert too_many.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await client.health() == 1


async def test_every_doc_page_through_the_proxy_over_http2_in_one_call(
    start_service: ..., tinyproxy: Tinyproxy, nginx: Nginx, doc_root: Path, doc_pages: list[str]
) -> None:
    service = start_service("--proxy", tinyproxy.url, "--max-connections", "20")
    requests = [make_request(f"{nginx.https_url}/doc/{page}", id=page) for page in doc_pages]
    async with FetchClient(service.target) as client:
        results = await _collect(client, requests, concurrency=32)
    assert len(results) == len(doc_pages) >= 300
    for result in results:
        assert not result.HasField("error"), (result.id, result.error)
        assert result.http_version == "HTTP/2"
        assert result.body == (doc_root / result.id).read_bytes(), result.id


async def test_drain_finishes_in_flight_and_returns_the_rest_as_unavailable(
    start_service: ..., app_server: AppServer
) -> None:
    service = start_service("--grace-period", "10")
    requests = [make_request(f"{app_server.http_url}/delay?s=2&d={i}", id=str(i)) for i in range(12)]
    async with FetchClient(service.target) as client:
        stream = client.fetch_many(requests, concurrency=4)
        results_task = asyncio.create_task(_drain_collect(stream))
        await _until(lambda: _active(client), 4)
        service.terminate()
        await _until(lambda: client.health(), 2)  # NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.fetch(f"{app_server.http_url}/echo")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        results = await asyncio.wait_for(results_task, 15)
    assert sorted(int(r.id) for r in results) == list(range(12))
    finished = [r for r in results if r.status_code == 200]
    unavailable = [r for r in results if r.error.kind == Kind.UNAVAILABLE]
    assert len(finished) >= 4 and len(finished) + len(unavailable) == 12 and unavailable
    assert service.wait(15) == 0


async def _drain_collect(stream: AsyncIterator[pb.FetchResult]) -> list[pb.FetchResult]:
    return [r async for r in stream]


async def _active(client: FetchClient) -> int:
    return (await client.pool_stats()).pools[0].requests_active


async def _until(probe: ..., expected: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (value := await probe()) != expected:
        assert time.monotonic() < deadline, f"still {value}, wanted {expected}"
        await asyncio.sleep(0.05)


async def test_drain_answers_every_item_even_when_fetches_outlive_the_grace_period(
    start_service: ..., app_server: AppServer
) -> None:
    service = start_service("--grace-period", "3")
    requests = [make_request(f"{app_server.http_url}/delay?s=30&g={i}", id=str(i)) for i in range(20)]
    async with FetchClient(service.target) as client:
        stream = client.fetch_many(requests, concurrency=5)
        results_task = asyncio.create_task(_drain_collect(stream))
        await _until(lambda: _active(client), 5)
        service.terminate()
        results = await asyncio.wait_for(results_task, 15)
    assert sorted(int(r.id) for r in results) == list(range(20))
    assert all(r.error.kind == Kind.UNAVAILABLE for r in results)
    stopped = [r for r in results if "stopped by" in r.error.message]
    assert len(stopped) == 5 and all(r.attempts == 1 for r in stopped)
    assert service.wait(10) == 0
