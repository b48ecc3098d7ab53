"""Telemetry set-up from the environment, redaction, bounded export with drop counting, the Prometheus
endpoint, and the names table of telemetry/README.md."""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import fetchpool.telemetry
import pytest
from fetchpool.errors import ConfigError
from fetchpool.telemetry import TelemetryConfig, setup_telemetry
from fetchpool.telemetry import names as n
from fetchpool.telemetry.redact import redact_url, server_of
from fetchpool.telemetry.setup import Telemetry, _BoundedSpanProcessor, _Drops, build_resource
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from support import free_port

README = Path(fetchpool.telemetry.__file__).with_name("README.md")


# --- configuration from the environment ---------------------------------------------------------
def test_nothing_configured_means_no_telemetry_and_no_sdk_import() -> None:
    assert setup_telemetry(env={}) is None
    assert not TelemetryConfig.from_env({}).enabled


@pytest.mark.parametrize(("env", "traces", "metrics", "port"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ("otlp",), ("otlp",), 0),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, ("otlp",), (), 0),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}, (), ("otlp",), 0),
    ({"OTEL_TRACES_EXPORTER": "console,otlp", "OTEL_METRICS_EXPORTER": "console"}, ("console", "otlp"), ("console",),
     0),
    ({"OTEL_METRICS_EXPORTER": "prometheus"}, (), (), 9464),
    ({"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "9999"}, (), (), 9999),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}, (), (), 0),
    ({"OTEL_SDK_DISABLED": "TRUE", "FETCHPOOL_METRICS_PORT": "9090"}, (), (), 9090),
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, (), (), 0),
])
def test_which_exporters_run(env: dict[str, str], traces: tuple[str, ...], metrics: tuple[str, ...],
                             port: int) -> None:
    config = TelemetryConfig.from_env(env, "0.0.0.0")
    assert (config.trace_exporters, config.metric_exporters, config.prometheus_port) == (traces, metrics, port)
    assert config.prometheus_host == "0.0.0.0"


def test_protocols_hosts_and_phase_modes() -> None:
    config = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                                       "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
                                       "OTEL_EXPORTER_PROMETHEUS_HOST": "[::]",
                                       "FETCHPOOL_TRACE_PHASES": "SPANS"})
    assert (config.trace_protocol, config.metric_protocol) == ("http/protobuf", "grpc")
    assert config.prometheus_host == "::" and config.trace_phases == "spans"
    assert TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}).trace_protocol == "grpc"
    assert TelemetryConfig.from_env({}).trace_phases == "events"


@pytest.mark.parametrize("env", [{"FETCHPOOL_METRICS_PORT": "x"}, {"FETCHPOOL_METRICS_PORT": "70000"},
                                 {"FETCHPOOL_TRACE_PHASES": "all"}])
def test_malformed_fetchpool_settings_are_config_errors(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        TelemetryConfig.from_env(env)


def test_the_resource_takes_kubernetes_attributes_and_lets_otel_variables_win(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.node.name=from-otel,team=crawl")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    env = {"K8S_POD_NAME": "fp-0", "POD_NAMESPACE": "ns", "K8S_NODE_NAME": "node-1"}
    attributes = build_resource(env).attributes
    assert attributes["service.name"] == "fetchpool" and attributes["service.instance.id"] == "fp-0"
    assert (attributes["k8s.pod.name"], attributes["k8s.namespace.name"]) == ("fp-0", "ns")
    assert attributes["k8s.node.name"] == "from-otel" and attributes["team"] == "crawl"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "crawler")
    assert build_resource({}).attributes["service.name"] == "crawler"


# --- redaction ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "redacted"), [
    ("https://example.com/a?b=c", "https://example.com/a?b=c"),
    ("https://user:pass@example.com/", "https://REDACTED:REDACTED@example.com/"),
    ("http://user@example.com:8080/x", "http://REDACTED:REDACTED@example.com:8080/x"),
    ("https://example.com/p@th?x=a@b", "https://example.com/p@th?x=a@b"),
    ("https://u:p@h/?AWSAccessKeyId=AK&Signature=s%2B&Expires=1", "https://REDACTED:REDACTED@h/"
     "?AWSAccessKeyId=REDACTED&Signature=REDACTED&Expires=1"),
    ("https://h/o?X-Goog-Signature=abc&X-Goog-Credential=cred#sig=1", "https://h/o?X-Goog-Signature=REDACTED"
     "&X-Goog-Credential=REDACTED#sig=1"),
    ("https://h/b?sv=2020&sig=xyz", "https://h/b?sv=2020&sig=REDACTED"),
    ("https://h/s3?X-Amz-Signature=1&x-amz-credential=2&X-Amz-Security-Token=3", "https://h/s3?X-Amz-Signature="
     "REDACTED&x-amz-credential=REDACTED&X-Amz-Security-Token=REDACTED"),
    ("https://h/?signature", "https://h/?signature"),
    ("not a url @ all?sig=1", "not a url @ all?sig=REDACTED"),
])
def test_url_full_is_redacted(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_very_long_urls_are_cut() -> None:
    url = "https://h/" + "a" * 10_000
    assert len(redact_url(url)) == 4096 and redact_url(url).endswith("...")


@pytest.mark.parametrize(("url", "server"), [
    ("https://Example.com/x", ("example.com", 443, "https")),
    ("http://u:p@host:8080/p?q", ("host", 8080, "http")),
    ("https://[::1]:8443/", ("::1", 8443, "https")),
    ("http://h:99999/", ("", None, "")),
    ("nonsense", ("", None, "")),
])
def test_server_address_and_port(url: str, server: tuple[str, int | None, str]) -> None:
    assert server_of(url) == server


# --- bounded export -----------------------------------------------------------------------------
class _Blocking(SpanExporter):
    def __init__(self, result: SpanExportResult = SpanExportResult.SUCCESS) -> None:
        self.gate = threading.Event()
        self.result = result
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.gate.wait(10)
        self.exported += len(spans)
        return self.result

    def shutdown(self) -> None:
        self.gate.set()


def _span(tracer_provider: TracerProvider, name: str = "s") -> None:
    tracer_provider.get_tracer("t").start_span(name).end()


def test_a_full_queue_drops_counts_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    drops = _Drops()
    exporter = _Blocking()
    processor = _BoundedSpanProcessor(exporter, drops, "a stuck collector",
                                      {"OTEL_BSP_MAX_QUEUE_SIZE": "10"})
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(processor)
    with caplog.at_level(logging.WARNING, logger="fetchpool.telemetry.setup"):
        for i in range(40):
            _span(tracer_provider, str(i))
    assert drops.counts[("traces", "queue_full")] >= 20
    assert sum("dropping traces telemetry" in r.getMessage() for r in caplog.records) == 1
    exporter.gate.set()
    processor.shutdown()


def test_failed_exports_are_counted_in_the_drop_metric(caplog: pytest.LogCaptureFixture) -> None:
    reader = InMemoryMetricReader()
    telemetry = Telemetry(metric_readers=[reader])
    exporter = _Blocking(SpanExportResult.FAILURE)
    exporter.gate.set()
    processor = _BoundedSpanProcessor(exporter, telemetry.drops, "nowhere", {})
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(processor)
    for _ in range(3):
        _span(tracer_provider)
    processor.force_flush()
    data = reader.get_metrics_data()
    [point] = [p for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
               if m.name == n.TELEMETRY_DROPPED.name for p in m.data.data_points]
    assert point.value == 3
    assert dict(point.attributes) == {n.TELEMETRY_SIGNAL: "traces", n.ERROR_TYPE: "export_failed"}
    processor.shutdown()


def test_shutdown_is_bounded_even_when_the_exporter_hangs() -> None:
    import time

    exporter = _Blocking()
    processor = _BoundedSpanProcessor(exporter, _Drops(), "a black hole", {})
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(processor)
    _span(tracer_provider)
    telemetry = Telemetry(tracer_provider=tracer_provider, closers=[processor.exporter.shutdown])
    started = time.monotonic()
    telemetry.shutdown(timeout=1.0)
    assert time.monotonic() - started < 2.5


# --- the Prometheus endpoint --------------------------------------------------------------------
def test_the_prometheus_endpoint_uses_the_documented_names() -> None:
    port = free_port()
    telemetry = setup_telemetry(env={"FETCHPOOL_METRICS_PORT": str(port)}, set_global=False)
    assert telemetry is not None and telemetry.tracer_provider is None and telemetry.instruments is not None
    telemetry.observer.connection_closed("direct", 2.0, "HTTP/2")  # no engine attached: no pool yet
    telemetry.instruments.request_duration.record(0.02, ("GET", 200, None, "2", "https", "direct"))
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        telemetry.shutdown(2.0)
    assert "\nfetchpool_demand_requests 0.0\n" in text
    # fetchpool's own histograms, through the reader: buckets are cumulative in Prometheus
    assert 'http_client_request_duration_seconds_bucket{fetchpool_pool_name="direct",http_request_method="GET",' \
           'http_response_status_code="200",le="0.01",network_protocol_version="2",url_scheme="https"} 0.0' in text
    assert 'http_client_request_duration_seconds_bucket{fetchpool_pool_name="direct",http_request_method="GET",' \
           'http_response_status_code="200",le="0.025",network_protocol_version="2",url_scheme="https"} 1.0' in text
    assert 'http_client_connection_duration_seconds_count{fetchpool_pool_name="direct",' \
           'network_protocol_version="2"} 1.0' in text
    assert "target_info{" in text and 'service_name="fetchpool"' in text
    assert "otel_scope_name" not in text


def test_the_prometheus_endpoint_shows_exemplars_to_openmetrics_scrapers() -> None:
    """Each bucket's latest traced value, with its trace and span ids, in the OpenMetrics
    exposition (what Prometheus asks for); the classic text format has no exemplars."""
    from opentelemetry.trace import SpanContext, TraceFlags

    port = free_port()
    telemetry = setup_telemetry(env={"FETCHPOOL_METRICS_PORT": str(port)}, set_global=False)
    assert telemetry is not None and telemetry.instruments is not None
    span = SpanContext(0x5B8EFFF798038103D269B633813FC60C, 0xEEE19B7EC3C1B174, False, TraceFlags(TraceFlags.SAMPLED))
    key = ("GET", 200, None, "2", "https", "direct")
    telemetry.instruments.request_duration.record(0.02, key, span, 1_700_000_000_000_000_000)
    telemetry.instruments.request_duration.record(0.3, key)  # untraced: no exemplar in its bucket
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        request = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        openmetrics = urllib.request.urlopen(request, timeout=5).read().decode()
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        telemetry.shutdown(2.0)
    with_exemplars = [line for line in openmetrics.splitlines() if " # {" in line]
    assert with_exemplars == [
        'http_client_request_duration_seconds_bucket{fetchpool_pool_name="direct",http_request_method="GET",'
        'http_response_status_code="200",le="0.025",network_protocol_version="2",url_scheme="https"} 1.0 # '
        '{span_id="eee19b7ec3c1b174",trace_id="5b8efff798038103d269b633813fc60c"} 0.02 1700000000.0'
    ]
    assert "trace_id" not in text


def test_a_taken_prometheus_port_is_a_config_error() -> None:
    port = free_port()
    first = setup_telemetry(env={"FETCHPOOL_METRICS_PORT": str(port)}, set_global=False)
    try:
        with pytest.raises(ConfigError, match="cannot serve Prometheus metrics"):
            setup_telemetry(env={"FETCHPOOL_METRICS_PORT": str(port)}, set_global=False)
    finally:
        assert first is not None
        first.shutdown(2.0)


# --- documentation ------------------------------------------------------------------------------
def test_the_readme_documents_every_metric_and_phase() -> None:
    text = README.read_text(encoding="utf-8")
    assert n.metric_table() in text, "regenerate the table: python -c 'from fetchpool.telemetry import names; " \
                                     "print(names.metric_table())'"
    for span_name in n.PHASE_SPANS.values():
        assert f"`{span_name}`" in text
    for attribute in (n.URL_FULL, n.CONNECTION_REUSED, n.POOL_NAME, n.PHASE_DURATION, n.TLS_NEXT_PROTOCOL,
                      n.RPC_RESPONSE_STATUS_CODE, "FETCHPOOL_METRICS_PORT", "FETCHPOOL_TRACE_PHASES"):
        assert attribute in text
    assert "fetchpool_demand_requests" in text
