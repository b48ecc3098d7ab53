"""The gRPC side of telemetry, in process: a real ``serve()`` with the telemetry interceptor and the
SDK's in-memory exporters. SERVER spans with current RPC names, the caller's trace continued,
malformed ``traceparent`` tolerated, one span per call and one per fetch, the call duration metric."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from fetchpool.config import FetchSettings, ServerSettings, Settings
from fetchpool.server import serve
from fetchpool.telemetry import names as n
from fetchpool.telemetry.setup import Telemetry
from fetchpool.v1 import fetch_pb2 as pb
from fetchpool.v1 import fetch_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support import AppServer, Certs, Nginx

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
FETCH = "fetchpool.v1.FetchService/Fetch"
FETCH_MANY = "fetchpool.v1.FetchService/FetchMany"


@asynccontextmanager
async def _stub(telemetry: Telemetry, certs: Certs) -> AsyncIterator[pb_grpc.FetchServiceStub]:
    async with _channel(telemetry, certs) as channel:
        yield pb_grpc.FetchServiceStub(channel)


@asynccontextmanager
async def _channel(telemetry: Telemetry, certs: Certs) -> AsyncIterator[grpc.aio.Channel]:
    settings = Settings(server=ServerSettings(listen="127.0.0.1:0", grace_period=1.0),
                        fetch=FetchSettings(ca_bundle=str(certs.ca_pem), allow_targets=("127.0.0.0/8",)))
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings, observer=telemetry.observer, interceptors=telemetry.interceptors,
                                       on_engine=telemetry.attach, on_started=started.set_result, stop=stop))
    port = await asyncio.wait_for(asyncio.shield(started), 10)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        stop.set()
        await server


def _of_kind(spans: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.kind is kind]


def _rpc_points(reader: InMemoryMetricReader) -> list[Any]:
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == n.RPC_SERVER_CALL_DURATION.name:
                    assert metric.unit == "s"
                    return list(metric.data.data_points)
    return []


async def test_the_callers_trace_is_continued_down_to_the_fetch(
    telemetry: Telemetry, spans: InMemorySpanExporter, reader: InMemoryMetricReader, nginx: Nginx, certs: Certs
) -> None:
    async with _stub(telemetry, certs) as stub:
        result = await stub.Fetch(pb.FetchRequest(url=f"{nginx.https_url}/small.html", id="a"),
                                  metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),))
    assert result.status_code == 200
    [server] = _of_kind(spans, SpanKind.SERVER)
    [client] = _of_kind(spans, SpanKind.CLIENT)
    assert server.name == FETCH
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_ID and server.parent.is_remote
    assert dict(server.attributes or {}) == {
        n.RPC_SYSTEM_NAME: "grpc", n.RPC_METHOD: FETCH, n.RPC_RESPONSE_STATUS_CODE: "OK",
        n.RPC_SYSTEM_LEGACY: "grpc", n.RPC_SERVICE_LEGACY: "fetchpool.v1.FetchService",
        n.RPC_GRPC_STATUS_CODE_LEGACY: 0,
    }
    assert server.status.status_code is StatusCode.UNSET
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.context.trace_id == server.context.trace_id
    [point] = _rpc_points(reader)
    assert dict(point.attributes) == {n.RPC_SYSTEM_NAME: "grpc", n.RPC_METHOD: FETCH,
                                      n.RPC_RESPONSE_STATUS_CODE: "OK"}
    assert point.count == 1
    assert server.end_time is not None and server.start_time is not None
    assert 0 < point.sum <= (server.end_time - server.start_time) / 1e9 + 0.01


@pytest.mark.parametrize("traceparent", ["garbage", f"00-{'0' * 32}-{PARENT_ID}-01", f"zz-{TRACE_ID}-x-01", ""])
async def test_a_malformed_traceparent_starts_a_new_trace(
    telemetry: Telemetry, spans: InMemorySpanExporter, nginx: Nginx, certs: Certs, traceparent: str
) -> None:
    async with _stub(telemetry, certs) as stub:
        result = await stub.Fetch(pb.FetchRequest(url=f"{nginx.https_url}/small.html"),
                                  metadata=(("traceparent", traceparent), ("tracestate", "=,=")))
    assert result.status_code == 200
    [server] = _of_kind(spans, SpanKind.SERVER)
    assert server.parent is None and server.context.is_valid
    assert f"{server.context.trace_id:032x}" != TRACE_ID


async def test_a_batch_is_one_server_span_and_one_client_span_per_fetch(
    telemetry: Telemetry, spans: InMemorySpanExporter, reader: InMemoryMetricReader, nginx: Nginx, certs: Certs
) -> None:
    requests = [pb.FetchRequest(url=f"{nginx.https_url}/small.html?b={i}", id=str(i)) for i in range(40)]
    async with _stub(telemetry, certs) as stub:
        results = [r async for r in stub.FetchMany(pb.FetchManyRequest(requests=requests, concurrency=8))]
    assert len(results) == 40
    [server] = _of_kind(spans, SpanKind.SERVER)
    clients = _of_kind(spans, SpanKind.CLIENT)
    assert server.name == FETCH_MANY and (server.attributes or {})[n.RPC_RESPONSES] == 40
    assert len(clients) == 40
    assert all(c.parent is not None and c.parent.span_id == server.context.span_id for c in clients)
    assert all(len(s.attributes or {}) < 20 and len(s.events) < 10 for s in spans.get_finished_spans())
    assert [p.count for p in _rpc_points(reader)] == [1]


async def test_streaming_calls_are_spans_too(
    telemetry: Telemetry, spans: InMemorySpanExporter, nginx: Nginx, certs: Certs
) -> None:
    async def outgoing() -> AsyncIterator[pb.FetchRequest]:
        for i in range(3):
            yield pb.FetchRequest(url=f"{nginx.https_url}/small.html?s={i}", id=str(i))

    async with _stub(telemetry, certs) as stub:
        results = [r async for r in stub.FetchStream(outgoing())]
    assert len(results) == 3
    [server] = _of_kind(spans, SpanKind.SERVER)
    assert server.name == "fetchpool.v1.FetchService/FetchStream"
    assert (server.attributes or {})[n.RPC_RESPONSES] == 3
    assert len(_of_kind(spans, SpanKind.CLIENT)) == 3


async def test_a_refused_call_carries_its_status_code(
    telemetry: Telemetry, spans: InMemorySpanExporter, reader: InMemoryMetricReader, certs: Certs
) -> None:
    async with _stub(telemetry, certs) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            _ = [r async for r in stub.FetchMany(pb.FetchManyRequest())]
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    [server] = _of_kind(spans, SpanKind.SERVER)
    attributes = dict(server.attributes or {})
    assert attributes[n.RPC_RESPONSE_STATUS_CODE] == "INVALID_ARGUMENT"
    assert attributes[n.RPC_GRPC_STATUS_CODE_LEGACY] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert attributes[n.ERROR_TYPE] == "INVALID_ARGUMENT"
    assert server.status.status_code is StatusCode.UNSET  # the caller's mistake, not a server error
    [point] = _rpc_points(reader)
    assert point.attributes[n.RPC_RESPONSE_STATUS_CODE] == "INVALID_ARGUMENT"


def _active_requests(reader: InMemoryMetricReader) -> float:
    data = reader.get_metrics_data()
    return sum(point.value for rm in (data.resource_metrics if data else ()) for sm in rm.scope_metrics
               for metric in sm.metrics if metric.name == n.HTTP_CLIENT_ACTIVE_REQUESTS.name
               for point in metric.data.data_points)


async def test_a_call_the_caller_cancels_is_cancelled(
    telemetry: Telemetry, spans: InMemorySpanExporter, reader: InMemoryMetricReader, app_server: AppServer,
    certs: Certs
) -> None:
    requests = [pb.FetchRequest(url=f"{app_server.https_url}/delay?s=5&c={i}") for i in range(3)]
    async with _stub(telemetry, certs) as stub:
        call = stub.FetchMany(pb.FetchManyRequest(requests=requests))
        for _ in range(100):  # cancelled once its three fetches are in flight (bounded: 5 s)
            await asyncio.sleep(0.05)
            if _active_requests(reader) == 3:
                break
        call.cancel()
        for _ in range(50):
            if _of_kind(spans, SpanKind.SERVER):
                break
            await asyncio.sleep(0.05)
    [server] = _of_kind(spans, SpanKind.SERVER)
    assert (server.attributes or {})[n.RPC_RESPONSE_STATUS_CODE] == "CANCELLED"
    clients = _of_kind(spans, SpanKind.CLIENT)
    assert len(clients) == 3 and {(c.attributes or {})[n.ERROR_TYPE] for c in clients} == {"CANCELLED"}


async def test_health_checks_are_not_traced(
    telemetry: Telemetry, spans: InMemorySpanExporter, reader: InMemoryMetricReader, certs: Certs
) -> None:
    async with _channel(telemetry, certs) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert spans.get_finished_spans() == ()
    assert _rpc_points(reader) == []
