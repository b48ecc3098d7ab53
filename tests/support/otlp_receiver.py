"""A real OTLP receiver on loopback: the trace and metrics services of ``opentelemetry-proto`` over
gRPC, and the same two over HTTP (``POST /v1/traces``, ``/v1/metrics``, protobuf bodies).

Keeps every span and metric it receives, flattened for assertions::

    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint}
        ...
        spans = receiver.wait_for_spans(lambda spans: len(spans) >= 3)
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from .process import free_port


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP ``KeyValue`` list -> dict."""
    return {kv.key: _value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


@dataclass
class Span:
    """One received span, flattened."""

    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind: 2 SERVER, 3 CLIENT, 1 INTERNAL
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    resource: dict[str, Any]
    scope: str
    events: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)  # (name, time_ns, attributes)

    @property
    def duration(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


@dataclass
class Metric:
    """One received metric (one export's data points of it), flattened."""

    name: str
    unit: str
    kind: str  # "sum", "gauge", "histogram", ...
    points: list[dict[str, Any]]  # {"attributes": {...}, "value": x} or histogram fields
    resource: dict[str, Any]


@dataclass
class _Store:
    spans: list[Span] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=lambda: {"grpc": 0, "http": 0})
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def add_traces(self, request: trace_service_pb2.ExportTraceServiceRequest, via: str) -> None:
        spans = []
        for rs in request.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    spans.append(Span(
                        name=sp.name, kind=sp.kind, trace_id=sp.trace_id.hex(), span_id=sp.span_id.hex(),
                        parent_span_id=sp.parent_span_id.hex(), start_ns=sp.start_time_unix_nano,
                        end_ns=sp.end_time_unix_nano, attributes=attributes(sp.attributes),
                        status_code=sp.status.code, resource=resource, scope=ss.scope.name,
                        events=[(e.name, e.time_unix_nano, attributes(e.attributes)) for e in sp.events]))
        with self.changed:
            self.spans += spans
            self.requests[via] += 1
            self.changed.notify_all()

    def add_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest, via: str) -> None:
        metrics = []
        for rm in request.resource_metrics:
            resource = attributes(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data") or ""
                    points = []
                    for p in getattr(m, kind).data_points if kind else ():
                        point: dict[str, Any] = {"attributes": attributes(p.attributes)}
                        if kind == "histogram":
                            point.update(count=p.count, sum=p.sum, bucket_counts=list(p.bucket_counts),
                                         explicit_bounds=list(p.explicit_bounds))
                        else:
                            point["value"] = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
                        points.append(point)
                    metrics.append(Metric(m.name, m.unit, kind, points, resource))
        with self.changed:
            self.metrics += metrics
            self.requests[via] += 1
            self.changed.notify_all()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: _Store) -> None:
        self._store = store

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self._store.add_traces(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self._store = store

    def Export(self, request: Any, context: Any) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self._store.add_metrics(request, "grpc")
        return metrics_service_pb2.ExportMetricsServiceResponse()


def _http_handler(store: _Store) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/v1/traces":
                trace_request = trace_service_pb2.ExportTraceServiceRequest()
                trace_request.ParseFromString(body)
                store.add_traces(trace_request, "http")
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            elif self.path == "/v1/metrics":
                metrics_request = metrics_service_pb2.ExportMetricsServiceRequest()
                metrics_request.ParseFromString(body)
                store.add_metrics(metrics_request, "http")
                reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    return Handler


class OtlpReceiver:
    """OTLP/gRPC on :attr:`grpc_endpoint` and OTLP/HTTP on :attr:`http_endpoint`, both on 127.0.0.1."""

    def __init__(self) -> None:
        self._store = _Store()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self._store), self._grpc)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(self._store), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"127.0.0.1:{free_port()}")
        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(self._store))
        self.http_port = self._http.server_address[1]
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def grpc_endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT`` (``http://`` means no TLS)."""
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT`` with ``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``."""
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> OtlpReceiver:
        self._grpc.start()
        self._http_thread.start()
        return self

    def stop(self) -> None:
        self._grpc.stop(0)
        self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def spans(self) -> list[Span]:
        with self._store.lock:
            return list(self._store.spans)

    @property
    def metrics(self) -> list[Metric]:
        with self._store.lock:
            return list(self._store.metrics)

    @property
    def requests(self) -> dict[str, int]:
        """Export requests received, by transport (``grpc``, ``http``)."""
        with self._store.lock:
            return dict(self._store.requests)

    def clear(self) -> None:
        with self._store.lock:
            self._store.spans.clear()
            self._store.metrics.clear()

    def _wait(self, get: Callable[[], list[Any]], done: Callable[[list[Any]], bool], timeout: float,
              what: str) -> list[Any]:
        deadline = time.monotonic() + timeout
        with self._store.changed:
            while True:
                items = list(get())
                if done(items):
                    return items
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the receiver did not get the expected {what} within {timeout} s; "
                                         f"got {len(items)}: {[getattr(i, 'name', i) for i in items][:40]}")
                self._store.changed.wait(left)

    def wait_for_spans(self, done: Callable[[list[Span]], bool], timeout: float = 15.0) -> list[Span]:
        """Block until ``done(spans)`` holds for everything received so far; returns the spans."""
        return self._wait(lambda: self._store.spans, done, timeout, "spans")

    def wait_for_metrics(self, done: Callable[[list[Metric]], bool], timeout: float = 15.0) -> list[Metric]:
        """Block until ``done(metrics)`` holds for everything received so far; returns the metrics."""
        return self._wait(lambda: self._store.metrics, done, timeout, "metrics")
