"""Call errors carry google.rpc.Status details a program can act on; health and reflection (v1 and
v1alpha) answer stock clients (issue 13, §5)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import grpc
import pytest
from fetchpool.client import FetchClient
from fetchpool.v1 import fetch_pb2 as pb
from fetchpool.v1 import fetch_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from support import AppServer
from support.callers import ReflectedClient, details, run_node
from support.fetchpool_service import FetchpoolService


def _error(call: ...) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


async def test_batch_errors_name_the_reason_and_the_field(start_service: ..., node_clients: None) -> None:
    service = start_service("--max-batch-size", "2")
    with ReflectedClient(service.target) as client:
        empty = _error(lambda: list(client.fetch_many([])))
        too_many = _error(lambda: list(client.fetch_many([client.request(url="http://127.0.0.1:1/")] * 3)))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = details(empty)
    assert (found["ErrorInfo"].reason, found["ErrorInfo"].domain) == ("EMPTY_BATCH", "fetchpool.io")
    assert [v.field for v in found["BadRequest"].field_violations] == ["requests"] and "RetryInfo" not in found
    assert too_many.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(too_many)
    assert found["ErrorInfo"].reason == "BATCH_TOO_LARGE"
    assert dict(found["ErrorInfo"].metadata) == {"batch_size": "3", "max_batch_size": "2"}
    assert "RetryInfo" not in found  # the same batch is refused again: split it
    _, done = await run_node({"target": service.target, "rpc": "FetchMany", "requests": []})
    assert (done["code"], done["error_info_reason"], done["field_violations"]) == (3, "EMPTY_BATCH", ["requests"])


def test_bad_limits_name_each_field(service: FetchpoolService) -> None:
    with grpc.insecure_channel(service.target) as channel:
        admin = pb_grpc.PoolAdminStub(channel)
        bad = pb.PoolLimits(max_connections=0, max_keepalive_connections=5)
        bad.pool_timeout.seconds = -1
        invalid = _error(lambda: admin.SetPoolLimits(pb.SetPoolLimitsRequest(limits=bad), timeout=5))
        missing = _error(lambda: admin.SetPoolLimits(
            pb.SetPoolLimitsRequest(pool="nope", limits=pb.PoolLimits(max_connections=5)), timeout=5))
    found = details(invalid)
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT and found["ErrorInfo"].reason == "INVALID_LIMITS"
    assert {v.field for v in found["BadRequest"].field_violations} == {
        "limits.max_connections", "limits.max_keepalive_connections", "limits.pool_timeout"}
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert details(missing)["ErrorInfo"].reason == "POOL_NOT_FOUND" and "direct" in missing.details()


async def test_a_draining_replica_says_when_to_retry(
    start_service: ..., app_server: AppServer, node_clients: None
) -> None:
    # The fetch in flight keeps the replica draining (up to the grace period) while the two
    # callers are refused; each step waits for the state it needs (a loaded machine is slow).
    service = start_service("--grace-period", "8")
    with ReflectedClient(service.target) as client:
        running = threading.Thread(target=lambda: list(client.fetch_many(
            [client.request(url=f"{app_server.http_url}/delay?s=6")], timeout=20)))
        running.start()
        async with FetchClient(service.target) as watcher:
            await _until(lambda: _active(watcher), "the fetch to start")
            service.terminate()
            await _until(lambda: _not_serving(watcher), "the replica to drain")
        refused = _error(lambda: client.fetch(url=f"{app_server.http_url}/echo", timeout=5))
        _, done = await run_node({"target": service.target, "rpc": "Fetch",
                                  "requests": [{"url": f"{app_server.http_url}/echo"}]})
        running.join(20)
    found = details(refused)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and found["ErrorInfo"].reason == "DRAINING"
    assert found["RetryInfo"].retry_delay.ToTimedelta().total_seconds() == 1.0
    assert (done["code"], done["error_info_reason"], done["retry_delay_seconds"]) == (14, "DRAINING", 1)
    assert service.wait(15) == 0


async def _until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"waited {timeout} s for {what}"
        await asyncio.sleep(0.05)


async def _active(client: FetchClient) -> bool:
    return (await client.pool_stats()).pools[0].requests_active == 1


async def _not_serving(client: FetchClient) -> bool:
    return await client.health() != health_pb2.HealthCheckResponse.SERVING


def test_a_missing_token_is_named(start_service: ...) -> None:
    service = start_service("--auth-token", "s3cret")
    with grpc.insecure_channel(service.target) as channel:
        refused = _error(lambda: pb_grpc.FetchServiceStub(channel).Fetch(pb.FetchRequest(url="http://a/"), timeout=5))
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in refused.details()
    assert details(refused)["ErrorInfo"].reason == "BAD_TOKEN"
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_in_both_versions(service: FetchpoolService, version: str) -> None:
    # v1 and v1alpha messages are the same bytes: v1alpha's classes speak both.
    with grpc.insecure_channel(service.target) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        listed, described = call(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=f"grpc.reflection.{version}.ServerReflection"),
        ]), timeout=5)
    names = {s.name for s in listed.list_services_response.service}
    assert {"fetchpool.v1.FetchService", "fetchpool.v1.PoolAdmin", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in described.file_descriptor_response.file_descriptor_proto]
    assert f"grpc.reflection.{version}" in {f.package for f in files}
