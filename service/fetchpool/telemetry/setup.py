"""Building the SDK from a :class:`TelemetryConfig`: resource, exporters with bounded queues that
never block a fetch, the Prometheus endpoint, and a bounded flush at shutdown.

A failing exporter (wrong or unreachable endpoint) costs the service nothing but dropped
telemetry: the span queue is bounded (``OTEL_BSP_MAX_QUEUE_SIZE``, default here 8192) and
overflows by dropping, exports run on the SDK's own threads, every drop is counted in
``fetchpool.telemetry.dropped``, and the first failure is logged once (the exporters' own
per-retry logging is silenced unless the log level is DEBUG).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from fetchpool.errors import ConfigError
from fetchpool.telemetry import names as n
from fetchpool.telemetry.config import TelemetryConfig
from fetchpool.telemetry.fetches import FetchTelemetry
from fetchpool.telemetry.histograms import Histograms, aggregates_like_us
from fetchpool.telemetry.metrics import Instruments
from fetchpool.telemetry.pools import PoolReader, SnapshotSource
from fetchpool.telemetry.rpc import ServerTelemetryInterceptor
from fetchpool.telemetry.spans import FinishedSpans

if TYPE_CHECKING:
    from fetchpool.telemetry.exemplars import OpenMetricsExemplars

logger = logging.getLogger(__name__)

#: Span queue size when ``OTEL_BSP_MAX_QUEUE_SIZE`` is unset (the SDK's 2048 overflows on a big batch).
DEFAULT_SPAN_QUEUE = 8192
#: Seconds :meth:`Telemetry.shutdown` may take by default.
SHUTDOWN_TIMEOUT = 5.0
#: Loggers of the SDK's exporters and batch processor: one line per retry or drop; we count instead.
_NOISY_LOGGERS = ("opentelemetry.exporter.otlp", "opentelemetry.sdk._shared_internal")


def _version() -> str:
    try:
        return importlib.metadata.version("fetchpool")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def build_resource(env: Mapping[str, str] | None = None) -> Resource:
    """``service.*`` defaults and Kubernetes attributes from the environment, overridden by
    ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME``."""
    env = os.environ if env is None else env
    attributes: dict[str, Any] = {"service.name": n.SERVICE_NAME_DEFAULT, "service.version": _version()}
    for attribute, variables in n.K8S_RESOURCE_ENV.items():
        value = next((env[v].strip() for v in variables if env.get(v, "").strip()), "")
        if value:
            attributes[attribute] = value
    attributes["service.instance.id"] = attributes.get("k8s.pod.name") or f"{socket.gethostname()}-{os.getpid()}"
    return Resource.create(attributes).merge(OTELResourceDetector().detect())


class _Drops:
    """Counts dropped telemetry into ``fetchpool.telemetry.dropped`` (once it exists); logs once per signal."""

    def __init__(self) -> None:
        self.counter: Any = None
        self.counts: dict[tuple[str, str], int] = {}
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def add(self, count: int, signal: str, reason: str, detail: str = "") -> None:
        with self._lock:
            self.counts[signal, reason] = self.counts.get((signal, reason), 0) + count
            first = signal not in self._logged
            self._logged.add(signal)
        if self.counter is not None:
            self.counter.add(count, {n.TELEMETRY_SIGNAL: signal, n.ERROR_TYPE: reason})
        if first:
            logger.warning("dropping %s telemetry (%s%s); fetches are not affected; further drops are counted in %s"
                           " and not logged", signal, reason, f": {detail}" if detail else "", n.TELEMETRY_DROPPED.name)


class _GuardedSpanExporter(SpanExporter):
    """Counts failed exports as drops; shuts down once; exports nothing after shutdown."""

    def __init__(self, inner: SpanExporter, drops: _Drops, describe: str, on_export: Callable[[int], None]) -> None:
        self._inner = inner
        self._drops = drops
        self._describe = describe
        self._on_export = on_export
        self._shut = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._on_export(len(spans))
        if self._shut:
            self._drops.add(len(spans), "traces", "export_failed", "exporter shut down")
            return SpanExportResult.FAILURE
        try:
            result = self._inner.export(spans)
        except Exception as exc:
            result, detail = SpanExportResult.FAILURE, repr(exc)
        else:
            detail = f"export to {self._describe} failed"
        if result is not SpanExportResult.SUCCESS:
            self._drops.add(len(spans), "traces", "export_failed", detail)
        return result

    def shutdown(self) -> None:
        if not self._shut:
            self._shut = True
            self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _BoundedSpanProcessor(SpanProcessor):
    """A BatchSpanProcessor that counts what its full queue drops."""

    def __init__(self, exporter: SpanExporter, drops: _Drops, describe: str, env: Mapping[str, str]) -> None:
        self._capacity = int(env.get("OTEL_BSP_MAX_QUEUE_SIZE") or DEFAULT_SPAN_QUEUE)
        self._pending = 0
        self._lock = threading.Lock()
        self._drops = drops
        batch = min(int(env.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") or 512), self._capacity)
        self.exporter = _GuardedSpanExporter(exporter, drops, describe, self._taken)
        self._inner = BatchSpanProcessor(self.exporter, max_queue_size=self._capacity, max_export_batch_size=batch)

    def _taken(self, count: int) -> None:
        with self._lock:
            self._pending = max(0, self._pending - count)

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return
        with self._lock:
            full = self._pending >= self._capacity
            if not full:
                self._pending += 1
        if full:  # the batch processor drops its oldest span to take this one
            self._drops.add(1, "traces", "queue_full", f"more than {self._capacity} spans waiting for export")
        self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _GuardedMetricExporter(MetricExporter):
    """Counts failed metric exports (one item per export) as drops; shuts down once."""

    def __init__(self, inner: MetricExporter, drops: _Drops, describe: str) -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self._inner = inner
        self._drops = drops
        self._describe = describe
        self._shut = False

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        if self._shut:
            return MetricExportResult.FAILURE
        try:
            result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:
            result, detail = MetricExportResult.FAILURE, repr(exc)
        else:
            detail = f"export to {self._describe} failed"
        if result is not MetricExportResult.SUCCESS:
            self._drops.add(1, "metrics", "export_failed", detail)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        if not self._shut:
            self._shut = True
            self._inner.shutdown(timeout_millis=timeout_millis)


def _span_exporter(kind: str, protocol: str) -> tuple[SpanExporter, str]:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=None), "the console"
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        http_exporter = HttpSpanExporter()
        return http_exporter, f"OTLP/HTTP {http_exporter._endpoint}"
    from fetchpool.telemetry._otlp_compat import GrpcSpanExporter

    grpc_exporter = GrpcSpanExporter()
    return grpc_exporter, f"OTLP/gRPC {grpc_exporter._endpoint}"


def _metric_exporter(kind: str, protocol: str) -> tuple[MetricExporter, str]:
    if kind == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter(), "the console"
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

        http_exporter = HttpMetricExporter()
        return http_exporter, f"OTLP/HTTP {http_exporter._endpoint}"
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

    grpc_exporter = GrpcMetricExporter()
    return grpc_exporter, f"OTLP/gRPC {grpc_exporter._endpoint}"


def _bounded(action: Callable[[], object], seconds: float, what: str) -> bool:
    """Run ``action`` on a daemon thread for at most ``seconds``; whether it finished."""
    if seconds <= 0:
        return False
    worker = threading.Thread(target=action, name=f"fetchpool-telemetry-{what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        logger.info("telemetry %s did not finish within %.3g s; going on without it", what, seconds)
        return False
    return True


class Telemetry:
    """Traces and metrics of one process.

    ``observer`` goes to the engine (``Engine(settings, observer=...)``), ``interceptors`` to the
    gRPC server; :meth:`attach` the engine once it exists so pool gauges can read it, and call
    :meth:`shutdown` after serving to flush. With ``metric_readers`` it makes the meter provider
    (the readers export fetchpool's histograms too; the provider works even under
    ``OTEL_SDK_DISABLED``: :func:`build` passes only the readers the configuration allows).
    ``exemplar_views`` (:class:`~fetchpool.telemetry.exemplars.OpenMetricsExemplars`) are shown the
    histograms' exemplars. Tests build one over in-memory exporters and readers.
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        metric_readers: Sequence[MetricReader] = (),
        resource: Resource | None = None,
        phases: str = n.PHASES_AS_EVENTS,
        closers: Sequence[Callable[[], object]] = (),
        drops: _Drops | None = None,
        exemplar_views: Sequence[OpenMetricsExemplars] = (),
    ) -> None:
        self.tracer_provider = tracer_provider
        self.pools = PoolReader()
        version = _version()
        scope = InstrumentationScope(n.INSTRUMENTATION_SCOPE, version)
        tracer = tracer_provider.get_tracer(n.INSTRUMENTATION_SCOPE, version) if tracer_provider else None
        if not isinstance(tracer, SdkTracer):  # None, or the SDK's no-op under OTEL_SDK_DISABLED
            tracer = None
        self.meter_provider: MeterProvider | None = None
        self.instruments: Instruments | None = None
        self.drops = drops or _Drops()
        if metric_readers:
            resource = resource or Resource.create()
            self.meter_provider = MeterProvider(metric_readers=metric_readers, resource=resource,
                                                shutdown_on_exit=False)
            # OTEL_SDK_DISABLED=true makes the SDK a no-op; the readers we are given are the ones
            # the configuration asked for (only an explicit scrape endpoint under that variable).
            self.meter_provider._disabled = False
            own = all(aggregates_like_us(reader) for reader in metric_readers)
            if not own:
                logger.info("a metric reader asks for another histogram aggregation: the SDK aggregates them")
            self.instruments = Instruments(self.meter_provider.get_meter(n.INSTRUMENTATION_SCOPE, version), self.pools,
                                           sdk_histograms=not own)
            histograms = Histograms(self.instruments.histograms, scope, resource)
            for reader in metric_readers if own else ():
                histograms.attach(reader)
            for view in exemplar_views:  # the Prometheus endpoint's (telemetry/exemplars.py)
                view.show(histograms.all)
            self.drops.counter = self.instruments.dropped
        spans = FinishedSpans(tracer, scope) if tracer else None
        self.observer = FetchTelemetry(spans, self.instruments, phases)
        self.interceptor = ServerTelemetryInterceptor(tracer, self.instruments)
        self._closers = list(closers)
        self._shut = False

    @property
    def interceptors(self) -> list[ServerTelemetryInterceptor]:
        return [self.interceptor]

    def attach(self, engine: SnapshotSource) -> None:
        """Observe ``engine``'s pools (call on the engine's event loop)."""
        self.pools.attach(engine)

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Flush spans and a last collection of metrics, then stop; takes at most about ``timeout`` seconds.

        An unreachable endpoint gets what is left of the budget and no more.
        """
        if self._shut:
            return
        self._shut = True
        deadline = time.monotonic() + timeout
        self.observer.flush()
        tracer_provider, meter_provider = self.tracer_provider, self.meter_provider
        if tracer_provider is not None:
            _bounded(tracer_provider.force_flush, 0.6 * (deadline - time.monotonic()), "span flush")
        for close in self._closers:  # interrupt exporters still retrying
            try:
                close()
            except Exception:
                logger.debug("closing a telemetry exporter failed", exc_info=True)
        if tracer_provider is not None:
            _bounded(tracer_provider.shutdown, deadline - time.monotonic(), "trace shutdown")
        if meter_provider is not None:
            _bounded(meter_provider.shutdown, max(0.5, deadline - time.monotonic()), "metrics shutdown")


def build(config: TelemetryConfig, env: Mapping[str, str] | None = None, *, set_global: bool = False) -> Telemetry:
    """The SDK for ``config``; raises ConfigError when the Prometheus port cannot be bound."""
    env = os.environ if env is None else env
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    resource = build_resource(env)
    drops = _Drops()
    closers: list[Callable[[], object]] = []
    tracer_provider = None
    if config.traces:
        tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        for kind in config.trace_exporters:
            exporter, describe = _span_exporter(kind, config.trace_protocol)
            processor = _BoundedSpanProcessor(exporter, drops, describe, env)
            tracer_provider.add_span_processor(processor)
            closers.append(processor.exporter.shutdown)
    readers: list[MetricReader] = []
    exemplar_views: list[OpenMetricsExemplars] = []
    if config.metrics:
        for kind in config.metric_exporters:
            metric_exporter, describe = _metric_exporter(kind, config.metric_protocol)
            guarded = _GuardedMetricExporter(metric_exporter, drops, describe)
            readers.append(PeriodicExportingMetricReader(guarded))
        if config.prometheus_port:
            reader, exemplars = _prometheus(config.prometheus_host, config.prometheus_port, closers)
            readers.append(reader)
            exemplar_views.append(exemplars)
    telemetry = Telemetry(tracer_provider=tracer_provider, metric_readers=readers, resource=resource,
                          phases=config.trace_phases, closers=closers, drops=drops, exemplar_views=exemplar_views)
    meter_provider = telemetry.meter_provider
    if set_global:
        if tracer_provider is not None:
            trace_api.set_tracer_provider(tracer_provider)
        if meter_provider is not None:
            metrics_api.set_meter_provider(meter_provider)
    logger.info(
        "telemetry: traces %s, metrics %s%s",
        "+".join(config.trace_exporters) + f" ({config.trace_protocol}, phases as {config.trace_phases})"
        if config.traces else "off",
        "+".join(config.metric_exporters) or "no push",
        f", Prometheus on {config.prometheus_host}:{config.prometheus_port}" if config.prometheus_port else "",
    )
    return telemetry


def _prometheus(
    host: str, port: int, closers: list[Callable[[], object]]
) -> tuple[MetricReader, OpenMetricsExemplars]:
    """A Prometheus reader served on ``host:port`` (every path answers, ``/metrics`` among them),
    and the collector that adds the histograms' exemplars to its OpenMetrics exposition."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server

        from fetchpool.telemetry.exemplars import OpenMetricsExemplars
    except ImportError as exc:
        raise ConfigError(f"the Prometheus endpoint needs opentelemetry-exporter-prometheus: {exc}") from None

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    exporter_registry = CollectorRegistry()  # served through the exemplars' collector
    reader = PrometheusMetricReader(registry=exporter_registry, scope_info_enabled=False)  # no otel_scope_* labels
    exemplars = OpenMetricsExemplars(exporter_registry)
    registry.register(exemplars)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve Prometheus metrics on {host}:{port}: {exc}") from None

    def close() -> None:
        server.shutdown()
        server.server_close()
        thread.join(1.0)

    closers.append(close)
    return reader, exemplars
