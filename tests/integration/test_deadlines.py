"""The caller's deadline bounds every fetch of its call: what is still running comes back as a
TIMEOUT result before the deadline, so the caller keeps every result (issue 13, §3)."""

from __future__ import annotations

import asyncio
import time

import grpc
from fetchpool.client import FetchClient
from fetchpool.v1 import fetch_pb2 as pb
from support import AppServer
from support.callers import ReflectedClient, run_node
from support.fetchpool_service import FetchpoolService

TIMEOUT = pb.FetchError.TIMEOUT


async def _idle(client: FetchClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (stats := (await client.pool_stats()).pools[0]).requests_active or stats.connections_active:
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.1)


def test_a_batch_keeps_every_result_when_its_deadline_comes(service: FetchpoolService, app_server: AppServer) -> None:
    fast = [(f"fast{i}", f"{app_server.http_url}/echo?d={i}", 0) for i in range(4)]
    slow = [(f"slow{i}", f"{app_server.http_url}/delay?s=30&d={i}", 0) for i in range(3)]
    own = [("own-timeout", f"{app_server.http_url}/delay?s=30&own", 1)]
    with ReflectedClient(service.target) as client:
        requests = [client.request(id=i, url=url, timeout={"seconds": t} if t else None) for i, url, t in
                    fast + slow + own]
        started = time.monotonic()
        results = {r.id: r for r in client.fetch_many(requests, timeout=3, concurrency=8)}
        elapsed = time.monotonic() - started
    assert elapsed < 3 and set(results) == {i for i, _, _ in fast + slow + own}
    assert all(results[i].status_code == 200 for i, _, _ in fast)
    for i, _, _ in slow:
        assert results[i].error.kind == TIMEOUT and "call's deadline" in results[i].error.message, results[i]
        assert 2.2 < results[i].timings.total_seconds < 3  # the margin is 0.3 s, the way in a loaded machine's
    # A request's own, shorter timeout is its own: not blamed on the deadline.
    assert results["own-timeout"].error.kind == TIMEOUT and "deadline" not in results["own-timeout"].error.message


def test_items_the_deadline_leaves_no_time_for_are_timeout_results(
    service: FetchpoolService, app_server: AppServer
) -> None:
    with ReflectedClient(service.target) as client:
        requests = [client.request(id=str(i), url=f"{app_server.http_url}/delay?s=30&n={i}") for i in range(6)]
        results = list(client.fetch_many(requests, timeout=2, concurrency=2))
    assert sorted(r.id for r in results) == [str(i) for i in range(6)]
    assert all(r.error.kind == TIMEOUT for r in results)
    assert sum("stopped after" in r.error.message for r in results) == 2
    assert sum("not started" in r.error.message for r in results) == 4


async def test_a_grpc_js_stream_gets_its_results_before_the_deadline(
    service: FetchpoolService, app_server: AppServer, node_clients: None
) -> None:
    requests = [{"id": "fast", "url": f"{app_server.http_url}/echo?js"},
                {"id": "slow", "url": f"{app_server.http_url}/delay?s=30&js"}]
    results, done = await run_node({
        "target": service.target, "rpc": "FetchStream", "deadline_ms": 2500, "requests": requests,
        "steps": [{"send": 0}, {"send": 1}, {"await": 2}],
    })
    assert done["code"] == 0, done
    assert {r["id"]: r["error_kind"] for r in results} == {"fast": "", "slow": "TIMEOUT"}
    assert max(r["elapsed_ms"] for r in results) < 2500


async def test_a_unary_fetch_past_its_deadline_is_a_timeout_result(
    service: FetchpoolService, app_server: AppServer
) -> None:
    async with FetchClient(service.target) as client:
        await client.health()  # the channel's connect is not charged to the deadline below
        result = await client.fetch(f"{app_server.http_url}/delay?s=5", timeout=1.0)
        assert result.error.kind == TIMEOUT and "call's deadline" in result.error.message
        # Stopped 0.1 s before the deadline (its margin) less the call's way in, which a loaded
        # machine makes long: the fetch had most of the second, not none of it.
        assert 0.6 < result.timings.total_seconds < 1.0
        await _idle(client)
        # A deadline that leaves no time to answer at all may still be gRPC's DEADLINE_EXCEEDED.
        try:
            late = await client.fetch(f"{app_server.http_url}/delay?s=5", timeout=0.001)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            assert late.error.kind == TIMEOUT
        await _idle(client)
