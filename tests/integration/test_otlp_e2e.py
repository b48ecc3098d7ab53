"""End to end: a real ``fetchpool serve`` configured only through ``OTEL_*`` variables exports to a
real OTLP receiver on loopback (tests/support/otlp_receiver.py)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from fetchpool.telemetry import names as n
from fetchpool.v1 import fetch_pb2 as pb
from fetchpool.v1 import fetch_pb2_grpc as pb_grpc
from support import AppServer, Nginx, free_port
from support.fetchpool_service import FetchpoolService
from support.otlp_receiver import OtlpReceiver, Span

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
SERVER, CLIENT = 2, 3  # OTLP SpanKind


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def _env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint,
        "OTEL_SERVICE_NAME": "fetchpool-e2e",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=e2e",
        "K8S_POD_NAME": "fetchpool-7d9f-abcde",
        "K8S_NAMESPACE_NAME": "scraping",
        "K8S_NODE_NAME": "node-a",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        **extra,
    }


def _fetch_many(service: FetchpoolService, urls: list[str], *, concurrency: int = 0,
                metadata: tuple[tuple[str, str], ...] = ()) -> list[pb.FetchResult]:
    with grpc.insecure_channel(service.target) as channel:
        stub = pb_grpc.FetchServiceStub(channel)
        request = pb.FetchManyRequest(requests=[pb.FetchRequest(url=u, id=str(i)) for i, u in enumerate(urls)],
                                      concurrency=concurrency)
        return list(stub.FetchMany(request, metadata=metadata, timeout=60))


def _children(spans: list[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id]


def _phases(spans: list[Span], client: Span) -> list[tuple[str, float]]:
    """``(name, seconds)`` of a fetch's phases, from its events or its child spans."""
    if client.events:
        return [(name, attributes[n.PHASE_DURATION]) for name, _, attributes in client.events]
    return [(s.name, s.duration) for s in _children(spans, client)]


def test_our_spans_continue_the_callers_trace(
    start_service: Any, receiver: OtlpReceiver, nginx: Nginx
) -> None:
    service = start_service(env=_env(receiver))
    results = _fetch_many(service, [f"{nginx.https_url}/small.html?e2e={i}" for i in range(5)],
                          metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),))
    assert all(r.status_code == 200 for r in results)
    spans = receiver.wait_for_spans(lambda got: sum(s.kind == CLIENT for s in got) >= 5
                                    and any(s.kind == SERVER for s in got))
    [server] = [s for s in spans if s.kind == SERVER]
    clients = [s for s in spans if s.kind == CLIENT]
    assert server.name == "fetchpool.v1.FetchService/FetchMany"
    assert (server.trace_id, server.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert server.attributes[n.RPC_SYSTEM_NAME] == "grpc" and server.attributes[n.RPC_RESPONSE_STATUS_CODE] == "OK"
    assert len(clients) == 5
    for client in clients:
        assert (client.trace_id, client.parent_span_id) == (TRACE_ID, server.span_id)
        assert client.name == "GET" and client.attributes[n.HTTP_RESPONSE_STATUS_CODE] == 200
        phases = {name for name, _ in _phases(spans, client)}
        assert {"pool.acquire", "request.send", "response.headers", "response.body"} <= phases
    assert sum("tls.handshake" in {name for name, _ in _phases(spans, c)} for c in clients) >= 1
    assert len(spans) == 6  # phases are events by default
    resource = server.resource
    assert resource["service.name"] == "fetchpool-e2e"
    assert resource["deployment.environment.name"] == "e2e"
    assert (resource["k8s.pod.name"], resource["k8s.namespace.name"], resource["k8s.node.name"]) == (
        "fetchpool-7d9f-abcde", "scraping", "node-a")
    assert resource["service.instance.id"] == "fetchpool-7d9f-abcde"
    assert {s.scope for s in spans} == {n.INSTRUMENTATION_SCOPE}


def test_a_malformed_traceparent_starts_a_new_trace(
    start_service: Any, receiver: OtlpReceiver, nginx: Nginx
) -> None:
    service = start_service(env=_env(receiver))
    [result] = _fetch_many(service, [f"{nginx.https_url}/small.html"], metadata=(("traceparent", "00-xyz-01"),))
    assert result.status_code == 200
    spans = receiver.wait_for_spans(lambda got: any(s.kind == SERVER for s in got))
    [server] = [s for s in spans if s.kind == SERVER]
    assert server.parent_span_id == "" and len(server.trace_id) == 32 and server.trace_id != "0" * 32


@pytest.mark.parametrize("phases", ["spans", "events"])
def test_the_pool_wait_span_is_longer_when_the_pool_is_too_small(
    start_service: Any, receiver: OtlpReceiver, app_server: AppServer, phases: str
) -> None:
    urls = [f"{app_server.https_url}/delay?s=0.25&w={i}" for i in range(4)]
    waits = {}
    for name, connections in (("small", "1"), ("roomy", "10")):
        service = start_service("--max-connections", connections, "--max-requests", connections,
                                env=_env(receiver, OTEL_SERVICE_NAME=name, FETCHPOOL_TRACE_PHASES=phases))
        assert all(r.status_code == 200 for r in _fetch_many(service, urls, concurrency=4))
        spans = receiver.wait_for_spans(lambda got, name=name: sum(
            phase == "pool.acquire" for s in got if s.kind == CLIENT and s.resource["service.name"] == name
            for phase, _ in _phases(got, s)) >= 4)
        waits[name] = max(seconds for s in spans if s.kind == CLIENT and s.resource["service.name"] == name
                          for phase, seconds in _phases(spans, s) if phase == "pool.acquire")
        if phases == "spans":
            assert any(s.name == "pool.acquire" and s.resource["service.name"] == name for s in spans)
    # One connection: the 4th fetch waits for the three before it (3 x 0.25 s). Ten: none waits
    # behind another fetch, only for the connection they share to open, which takes less than one
    # fetch's 0.25 s delay however loaded the machine (a fixed 0.15 s was not, on 2 busy cores).
    assert waits["small"] > 0.6 > 0.25 > waits["roomy"], waits


def test_the_metrics_arrive_with_the_documented_names_and_units(
    start_service: Any, receiver: OtlpReceiver, nginx: Nginx
) -> None:
    service = start_service("--max-connections", "3", env=_env(receiver))
    assert all(r.status_code == 200 for r in _fetch_many(service, [f"{nginx.https_url}/small.html?m={i}"
                                                                   for i in range(6)]))
    expected = {m.name for m in n.METRICS} - {n.HTTP_CLIENT_CONNECTION_DURATION.name, n.TELEMETRY_DROPPED.name}
    metrics = receiver.wait_for_metrics(lambda got: expected <= {m.name for m in got})
    units = {m.name: m.unit for m in n.METRICS}
    for metric in metrics:
        if metric.name in units:
            assert metric.unit == units[metric.name], metric.name
    latest = {m.name: m for m in metrics}
    assert [p["value"] for p in latest[n.POOL_CONNECTION_MAX.name].points] == [3]
    assert latest[n.POOL_CONNECTION_MAX.name].points[0]["attributes"] == {n.POOL_NAME: "direct"}
    assert latest[n.DEMAND.name].kind == "sum"
    requests = [m for m in metrics if m.name == n.HTTP_CLIENT_REQUEST_DURATION.name][-1]
    assert sum(p["count"] for p in requests.points) == 6
    rpc = [m for m in metrics if m.name == n.RPC_SERVER_CALL_DURATION.name][-1]
    assert rpc.points[0]["attributes"] == {n.RPC_SYSTEM_NAME: "grpc",
                                           n.RPC_METHOD: "fetchpool.v1.FetchService/FetchMany",
                                           n.RPC_RESPONSE_STATUS_CODE: "OK"}
    assert metrics[0].resource["k8s.pod.name"] == "fetchpool-7d9f-abcde"


def test_otlp_over_http_is_an_option(start_service: Any, receiver: OtlpReceiver, nginx: Nginx) -> None:
    service = start_service(env=_env(receiver, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.http_endpoint,
                                     OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf"))
    assert _fetch_many(service, [f"{nginx.https_url}/small.html"])[0].status_code == 200
    receiver.wait_for_spans(lambda got: any(s.kind == CLIENT for s in got))
    receiver.wait_for_metrics(lambda got: any(m.name == n.DEMAND.name for m in got))
    assert receiver.requests["http"] >= 2 and receiver.requests["grpc"] == 0


def test_spans_are_flushed_on_graceful_shutdown(start_service: Any, receiver: OtlpReceiver, nginx: Nginx) -> None:
    service = start_service(env=_env(receiver, OTEL_BSP_SCHEDULE_DELAY="600000", OTEL_METRIC_EXPORT_INTERVAL="600000"))
    assert _fetch_many(service, [f"{nginx.https_url}/small.html?flush"])[0].status_code == 200
    time.sleep(0.3)
    assert receiver.spans == []
    service.terminate()
    assert service.wait(15) == 0
    spans = receiver.wait_for_spans(lambda got: any(s.kind == CLIENT for s in got), timeout=1)
    assert {s.kind for s in spans} >= {SERVER, CLIENT}
    receiver.wait_for_metrics(lambda got: any(m.name == n.HTTP_CLIENT_REQUEST_DURATION.name for m in got), timeout=1)


def test_an_unreachable_endpoint_neither_slows_nor_fails_fetches(start_service: Any, nginx: Nginx) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    service = start_service(env={"OTEL_EXPORTER_OTLP_ENDPOINT": dead, "OTEL_BSP_SCHEDULE_DELAY": "50",
                                 "OTEL_METRIC_EXPORT_INTERVAL": "200", "OTEL_EXPORTER_OTLP_TIMEOUT": "2"})
    started = time.monotonic()
    for round_ in range(3):
        results = _fetch_many(service, [f"{nginx.https_url}/small.html?dead={round_}-{i}" for i in range(100)])
        assert all(r.status_code == 200 and not r.HasField("error") for r in results)
        time.sleep(0.5)
    assert time.monotonic() - started < 20
    service.terminate()
    assert service.wait(15) == 0
    output = service.output()
    assert output.count("dropping traces telemetry") == 1, output[-3000:]
    assert output.count("dropping metrics telemetry") <= 1
    assert "Failed to export" not in output and "Transient error" not in output


def test_the_prometheus_endpoint_serves_the_demand_even_with_the_sdk_disabled(
    start_service: Any, app_server: AppServer
) -> None:
    port = free_port()
    service = start_service("--max-connections", "1", "--max-requests", "1",
                            env={"FETCHPOOL_METRICS_PORT": str(port), "OTEL_SDK_DISABLED": "true"})
    with grpc.insecure_channel(service.target) as channel:
        stub = pb_grpc.FetchServiceStub(channel)
        request = pb.FetchManyRequest(requests=[pb.FetchRequest(url=f"{app_server.https_url}/delay?s=1.5&p={i}")
                                                for i in range(3)])
        call = stub.FetchMany(request, timeout=30)
        for _ in range(100):  # read while the first fetch waits for its answer (1.5 s), not after
            time.sleep(0.05)
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if "\nfetchpool_demand_requests 3" in text:
                break
        assert len(list(call)) == 3
    samples: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            samples.setdefault(name, []).append((labels.rstrip("}"), float(value)))
    assert n.DEMAND.prometheus == "fetchpool_demand_requests"
    assert samples["fetchpool_demand_requests"] == [("", 3)]
    for metric in (n.HTTP_CLIENT_OPEN_CONNECTIONS, n.POOL_PENDING_REQUESTS, n.POOL_CONNECTION_MAX,
                   n.HTTP_CLIENT_ACTIVE_REQUESTS, n.POOL_TIMEOUTS):
        assert any(name.startswith(metric.prometheus) for name in samples), metric.prometheus
    assert samples[n.POOL_PENDING_REQUESTS.prometheus] == [('fetchpool_pool_name="direct"', 2)]
    assert samples[n.HTTP_CLIENT_ACTIVE_REQUESTS.prometheus] == [('fetchpool_pool_name="direct"', 1)]
