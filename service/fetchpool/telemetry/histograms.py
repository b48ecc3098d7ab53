"""Histograms aggregated by fetchpool itself and handed to the SDK's metric readers.

Why not the SDK's synchronous ``Histogram``: its ``record`` costs about 6 µs here (a
``Measurement`` object, the attributes copied, validated and hashed, then a lock), and every
fetch records two or three values; that was a fifth of the telemetry's cost per fetch. Here a
record is a lookup by a tuple of attribute values, a bisect and a few additions (about 1 µs).

The points come out as the SDK's own :class:`~opentelemetry.sdk.metrics.export.Histogram`
metrics, added to what each reader collects through the reader's ``_receive_metrics`` (the
SDK's documented extension point for readers), so the OTLP exporters, the console and the
Prometheus endpoint see them like any other instrument. The aggregation is the SDK's explicit
bucket histogram: bucket ``i`` counts the values in ``(bounds[i-1], bounds[i]]``, negative and
non-finite values are ignored, points are cumulative or delta as the reader asks, and past
:data:`CARDINALITY_LIMIT` attribute sets per histogram new sets go to one overflow point
(``otel.metric.overflow=true``). One difference: the limit counts attribute sets over the life of
the process for delta readers too, where the SDK counts them per interval.

Exemplars: a value recorded with the context of a sampled span (the fetch's CLIENT span, the
call's SERVER span) becomes its bucket's exemplar, replacing the one before: the SDK's
``AlignedHistogramBucketExemplarReservoir``, the default reservoir of explicit-bucket histograms,
keeps the same (the last measurement of each bucket). As the SDK's, a point carries the exemplars
recorded since its reader's previous collection, for cumulative and delta readers alike. Values
recorded without a sampled span leave the bucket's exemplar as it was. The Prometheus endpoint
shows each bucket's latest (:mod:`fetchpool.telemetry.exemplars`).

A reader that asks for another histogram aggregation (exponential buckets with
``OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION=base2_exponential_bucket_histogram``,
or explicit buckets of its own) gets what it asks for: :func:`aggregates_like_us` says no, and
the histograms are then recorded into the SDK's own instruments (:class:`SdkHistogram`), at the
SDK's cost.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics import Histogram as SdkHistogramInstrument
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics.view import DefaultAggregation, ExplicitBucketHistogramAggregation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from fetchpool.telemetry import names as n

#: Attribute sets per histogram before new ones go to the overflow point (the SDK's default).
CARDINALITY_LIMIT = 2000
_OVERFLOW: tuple[Any, ...] = ("otel.metric.overflow",)
_OVERFLOW_ATTRIBUTES = {"otel.metric.overflow": True}

#: A bucket's exemplar as recorded: (value, time in ns since the epoch, trace id, span id).
Sample = tuple[float, int, int, int]


def _attributes(keys: tuple[str, ...], key: tuple[Any, ...]) -> dict[str, Any]:
    """The attributes a key stands for: each name of ``keys`` with its value in ``key``, unless None."""
    return {name: value for name, value in zip(keys, key, strict=True) if value is not None}


class _Point:
    """One attribute set's aggregate; ``windows`` holds a [min, max] per delta reader."""

    __slots__ = ("attributes", "bucket_counts", "count", "exemplars", "max", "min", "start_ns", "sum", "windows")

    def __init__(self, attributes: dict[str, Any], buckets: int, windows: int) -> None:
        self.attributes = attributes
        self.start_ns = time.time_ns()
        self.bucket_counts = [0] * buckets
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.windows = [[math.inf, -math.inf] for _ in range(windows)]
        self.exemplars: list[Sample | None] | None = None  # per bucket, made with the first one


class Histogram:
    """An explicit-bucket histogram of ``metric``, whose attributes are ``metric.attributes`` in that
    order; ``bounds`` are the bucket boundaries (ascending, in the metric's unit)."""

    def __init__(self, metric: n.MetricName, bounds: Sequence[float]) -> None:
        self.metric = metric
        self.bounds = tuple(bounds)
        self.keys = metric.attributes
        self._points: dict[tuple[Any, ...], _Point] = {}
        self._windows = 0
        self._lock = threading.Lock()

    def record(self, value: float, key: tuple[Any, ...], span: trace.SpanContext | None = None,
               time_ns: int = 0) -> None:
        """Count ``value``; ``key`` holds the value of each attribute of :attr:`keys` (None: not set).

        ``span``, the context of the sampled span the value belongs to, makes the value its bucket's
        exemplar, observed at ``time_ns`` (ns since the epoch)."""
        if not 0.0 <= value < math.inf:  # as the SDK: negative, infinite and NaN values are ignored
            return
        with self._lock:
            point = self._points.get(key)
            if point is None:
                point = self._add(key)
            bucket = bisect_left(self.bounds, value)
            point.bucket_counts[bucket] += 1
            if span is not None:
                if point.exemplars is None:
                    point.exemplars = [None] * len(point.bucket_counts)
                point.exemplars[bucket] = (value, time_ns, span.trace_id, span.span_id)
            point.count += 1
            point.sum += value
            if value < point.min:
                point.min = value
            if value > point.max:
                point.max = value
            for window in point.windows:
                if value < window[0]:
                    window[0] = value
                if value > window[1]:
                    window[1] = value

    def _add(self, key: tuple[Any, ...]) -> _Point:
        if len(self._points) >= CARDINALITY_LIMIT:
            key = _OVERFLOW
            point = self._points.get(key)
            if point is not None:
                return point
            attributes = dict(_OVERFLOW_ATTRIBUTES)
        else:
            attributes = _attributes(self.keys, key)
        point = self._points[key] = _Point(attributes, len(self.bounds) + 1, self._windows)
        return point

    def exemplars(self) -> list[tuple[dict[str, Any], list[Sample | None]]]:
        """(attributes, each bucket's exemplar or None) of every point that has one."""
        with self._lock:
            return [(point.attributes, list(point.exemplars)) for point in self._points.values() if point.exemplars]

    def _open_window(self) -> int:
        """Start tracking min/max per collection interval for one more delta reader; its index."""
        with self._lock:
            for point in self._points.values():
                point.windows.append([math.inf, -math.inf])
            self._windows += 1
            return self._windows - 1


class SdkHistogram:
    """:class:`Histogram`'s ``record(value, key)`` onto an SDK histogram instrument of ``meter``."""

    def __init__(self, meter: Meter, metric: n.MetricName, bounds: Sequence[float]) -> None:
        self.metric = metric
        self.keys = metric.attributes
        self._instrument = meter.create_histogram(metric.name, unit=metric.unit, description=metric.description,
                                                  explicit_bucket_boundaries_advisory=bounds)

    def record(self, value: float, key: tuple[Any, ...], span: trace.SpanContext | None = None,
               time_ns: int = 0) -> None:
        """Record ``value`` with the attributes of ``key`` that are set, in the context of ``span``
        (the SDK's exemplar filter and reservoir decide on exemplars; ``time_ns`` is the SDK's own)."""
        context = trace.set_span_in_context(trace.NonRecordingSpan(span)) if span is not None else None
        self._instrument.record(value, _attributes(self.keys, key), context=context)


def aggregates_like_us(reader: MetricReader) -> bool:
    """Whether ``reader`` wants histograms aggregated the way :class:`Histogram` does: the SDK's
    default aggregation, or explicit buckets with the instrument's own boundaries and min/max."""
    preferences = getattr(reader, "_instrument_class_aggregation", {})
    wanted = next((a for kind, a in preferences.items() if issubclass(kind, SdkHistogramInstrument)), None)
    if wanted is None or isinstance(wanted, DefaultAggregation):
        return True
    return (isinstance(wanted, ExplicitBucketHistogramAggregation)
            and getattr(wanted, "_boundaries", ()) is None and getattr(wanted, "_record_min_max", False) is True)


class _Collector:
    """What one reader gets from the histograms: cumulative, or delta against its previous collection."""

    def __init__(self, histograms: Sequence[Histogram], scope: InstrumentationScope, resource: Resource,
                 temporality: AggregationTemporality) -> None:
        self._histograms = histograms
        self._scope = scope
        self._resource = resource
        self._temporality = temporality
        delta = temporality is AggregationTemporality.DELTA
        self._windows = [h._open_window() for h in histograms] if delta else []
        self._previous: dict[tuple[int, tuple[Any, ...]], tuple[list[int], int, float]] = {}
        self._last_ns = time.time_ns()

    def metrics(self) -> list[Metric]:
        now = time.time_ns()
        metrics = []
        for index, histogram in enumerate(self._histograms):
            points = []
            with histogram._lock:
                for key, point in histogram._points.items():
                    if self._windows:
                        data = self._delta(index, key, point, now)
                    else:
                        data = HistogramDataPoint(
                            point.attributes, point.start_ns, now, point.count, point.sum,
                            tuple(point.bucket_counts), histogram.bounds, point.min, point.max,
                            _exemplars(point.exemplars, self._last_ns))
                    if data is not None:
                        points.append(data)
            if points:
                metrics.append(Metric(histogram.metric.name, histogram.metric.description, histogram.metric.unit,
                                      HistogramData(points, self._temporality)))
        self._last_ns = now
        return metrics

    def _delta(self, index: int, key: tuple[Any, ...], point: _Point, now: int) -> HistogramDataPoint | None:
        previous = self._previous.get((index, key))
        counts, count, total = previous if previous is not None else ([0] * len(point.bucket_counts), 0, 0.0)
        if point.count == count:
            return None
        self._previous[index, key] = (list(point.bucket_counts), point.count, point.sum)
        window = point.windows[self._windows[index]]
        low, high = window
        window[0], window[1] = math.inf, -math.inf
        start = self._last_ns if previous is not None else max(point.start_ns, self._last_ns)
        return HistogramDataPoint(
            point.attributes, start, now, point.count - count, point.sum - total,
            tuple(a - b for a, b in zip(point.bucket_counts, counts, strict=True)),
            self._histograms[index].bounds, low, high, _exemplars(point.exemplars, self._last_ns))

    def merge(self, data: MetricsData) -> MetricsData:
        """``data`` with the histograms added to this scope's metrics (of the first resource)."""
        metrics = self.metrics()
        if not metrics:
            return data
        resources = list(data.resource_metrics)
        if not resources:
            resources = [ResourceMetrics(self._resource, [], self._resource.schema_url)]
        first = resources[0]
        scopes = list(first.scope_metrics)
        for i, scope_metrics in enumerate(scopes):
            if scope_metrics.scope == self._scope:
                scopes[i] = ScopeMetrics(scope_metrics.scope, [*scope_metrics.metrics, *metrics],
                                         scope_metrics.schema_url)
                break
        else:
            scopes.append(ScopeMetrics(self._scope, metrics, self._scope.schema_url or ""))
        resources[0] = ResourceMetrics(first.resource, scopes, first.schema_url)
        return MetricsData(resources)


def _exemplars(samples: list[Sample | None] | None, since_ns: int) -> list[Exemplar]:
    """The SDK's exemplars of the samples observed after ``since_ns``."""
    if not samples:
        return []
    return [Exemplar({}, value, time_ns, span_id, trace_id)
            for value, time_ns, trace_id, span_id in filter(None, samples) if time_ns > since_ns]


class Histograms:
    """The histograms of one process, exported through the readers passed to :meth:`attach`."""

    def __init__(self, histograms: Sequence[Histogram], scope: InstrumentationScope, resource: Resource) -> None:
        self.all = tuple(histograms)
        self._scope = scope
        self._resource = resource

    def attach(self, reader: MetricReader) -> MetricReader:
        """Make ``reader`` export these histograms with what it collects (in the temporality it
        prefers for histograms); returns it. They ride along a collection of the SDK's instruments,
        and the SDK hands a reader nothing when none of them has data: fetchpool's
        ``fetchpool.demand.requests`` gauge always has."""
        # The reader's preferences, keyed by the SDK's instrument classes (its histogram's is a subclass).
        preferences = getattr(reader, "_instrument_class_temporality", {})
        temporality = next((t for kind, t in preferences.items() if issubclass(kind, SdkHistogramInstrument)),
                           AggregationTemporality.CUMULATIVE)
        collector = _Collector(self.all, self._scope, self._resource, temporality)
        receive = reader._receive_metrics

        def receive_with_histograms(metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
            receive(collector.merge(metrics_data), timeout_millis, **kwargs)

        reader._receive_metrics = receive_with_histograms  # type: ignore[method-assign]
        return reader
