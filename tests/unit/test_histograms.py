"""fetchpool's own histograms export what the SDK's Histogram exports for the same records."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import pytest
from fetchpool.telemetry import histograms as h
from fetchpool.telemetry import names as n
from fetchpool.telemetry.setup import Telemetry
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogram,
    InMemoryMetricReader,
    MetricsData,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, ExponentialBucketHistogramAggregation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

METRIC = n.MetricName("test.duration", "Histogram", "s", ("a", "b"), "for the test")
BOUNDS = (0.0, 0.5, 1.0, 2.5)
SCOPE = InstrumentationScope("fetchpool", "0")
DELTA = {SdkHistogram: AggregationTemporality.DELTA}

_VALUE = st.one_of(st.sampled_from([*BOUNDS, -1.0, math.inf, -math.inf, math.nan]),
                   st.floats(min_value=-5, max_value=5))
_KEY = st.tuples(st.sampled_from(["x", "y", None]), st.sampled_from([1, 2, None]))
_RECORDS = st.lists(st.tuples(_VALUE, _KEY), max_size=30)
#: Records made in a span: None (no span), or the number of a sampled (odd) or unsampled (even) span.
_TRACED_RECORDS = st.lists(st.tuples(_VALUE, _KEY, st.one_of(st.none(), st.integers(1, 6))), max_size=30)


def _span(number: int) -> SpanContext:
    flags = TraceFlags(TraceFlags.SAMPLED if number % 2 else TraceFlags.DEFAULT)
    return SpanContext(0xABC0 + number, 0x1230 + number, is_remote=False, trace_flags=flags)


class _Pair:
    """The same records into the SDK's histogram and into ours, each read by its own reader."""

    def __init__(self, temporality: dict[type, AggregationTemporality] | None = None) -> None:
        self.sdk_reader = InMemoryMetricReader(preferred_temporality=temporality)
        meter = MeterProvider(metric_readers=[self.sdk_reader]).get_meter("fetchpool", "0")
        self.sdk = meter.create_histogram(METRIC.name, unit=METRIC.unit, description=METRIC.description,
                                          explicit_bucket_boundaries_advisory=BOUNDS)
        self.ours = h.Histogram(METRIC, BOUNDS)
        self.our_reader = InMemoryMetricReader(preferred_temporality=temporality)
        h.Histograms([self.ours], SCOPE, Resource.create({})).attach(self.our_reader)
        # The reader needs a provider to collect from; it has no instruments of its own.
        MeterProvider(metric_readers=[self.our_reader]).get_meter("fetchpool", "0").create_counter("c").add(1)

    def record(self, records: Sequence[tuple[Any, ...]]) -> None:
        """(value, key) or (value, key, span number or None) records into both."""
        for value, key, *span in records:
            context = _span(span[0]) if span and span[0] is not None else None
            attributes = {name: v for name, v in zip(METRIC.attributes, key, strict=True) if v is not None}
            in_span = set_span_in_context(NonRecordingSpan(context)) if context else None
            self.sdk.record(value, attributes, context=in_span)
            # Our callers pass the span only when it was sampled (the SDK's trace-based filter).
            sampled = context if context is not None and context.trace_flags.sampled else None
            self.ours.record(value, key, sampled, time.time_ns())

    def points(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        return _points(self.sdk_reader.get_metrics_data()), _points(self.our_reader.get_metrics_data())


def _points(data: MetricsData | None) -> list[tuple[Any, ...]]:
    """The test histogram's points, comparable across the two: everything but the timestamps."""
    found = []
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == METRIC.name:
                    assert (metric.unit, metric.description) == (METRIC.unit, METRIC.description)
                    for p in metric.data.data_points:
                        assert p.start_time_unix_nano <= p.time_unix_nano
                        # The SDK adds up each collection's sum; the order of float additions differs.
                        exemplars = sorted((e.value, e.trace_id, e.span_id, dict(e.filtered_attributes or {}))
                                           for e in p.exemplars)
                        found.append((sorted(p.attributes.items()), p.count, round(p.sum, 9), tuple(p.bucket_counts),
                                      tuple(p.explicit_bounds), p.min, p.max, metric.data.aggregation_temporality,
                                      exemplars))
    return sorted(found, key=repr)


@settings(max_examples=150, deadline=None)
@given(_RECORDS, _RECORDS)
def test_cumulative_points_are_the_sdks(first: list[Any], second: list[Any]) -> None:
    pair = _Pair()
    pair.record(first)
    sdk, ours = pair.points()
    assert ours == sdk
    pair.record(second)
    sdk, ours = pair.points()
    assert ours == sdk


@settings(max_examples=150, deadline=None)
@given(_RECORDS, _RECORDS, _RECORDS)
def test_delta_points_are_the_sdks(first: list[Any], second: list[Any], third: list[Any]) -> None:
    pair = _Pair(DELTA)
    for records in (first, second, third):
        pair.record(records)
        sdk, ours = pair.points()
        assert ours == sdk


@settings(max_examples=150, deadline=None)
@given(_TRACED_RECORDS, _TRACED_RECORDS)
def test_exemplars_are_the_sdks(first: list[Any], second: list[Any]) -> None:
    """Values recorded in a sampled span are their bucket's exemplar (the last one wins), as the SDK's
    default reservoir keeps them, carried by the points of the collection that follows."""
    for temporality in (None, DELTA):
        pair = _Pair(temporality)
        for records in (first, second):
            pair.record(records)
            sdk, ours = pair.points()
            assert ours == sdk


def test_exemplars_for_the_prometheus_endpoint_are_each_buckets_latest() -> None:
    histogram = h.Histogram(METRIC, BOUNDS)
    histogram.record(0.2, ("x", 1), _span(1), 10)
    histogram.record(0.3, ("x", 1), _span(3), 20)  # same bucket: replaces
    histogram.record(7.0, ("x", 1), _span(5), 30)  # the +Inf bucket
    histogram.record(0.4, ("x", 1))  # no span: the bucket keeps its exemplar
    histogram.record(0.1, ("y", 2))  # a point without exemplars is left out
    [(attributes, samples)] = histogram.exemplars()
    assert attributes == {"a": "x", "b": 1}
    assert samples == [None, (0.3, 20, 0xABC3, 0x1233), None, None, (7.0, 30, 0xABC5, 0x1235)]


def test_past_the_cardinality_limit_new_sets_go_to_the_overflow_point(monkeypatch: Any) -> None:
    monkeypatch.setattr(h, "CARDINALITY_LIMIT", 3)
    histogram = h.Histogram(METRIC, BOUNDS)
    reader = InMemoryMetricReader()
    h.Histograms([histogram], SCOPE, Resource.create({})).attach(reader)
    MeterProvider(metric_readers=[reader]).get_meter("other").create_counter("c").add(1)
    for i in range(6):
        histogram.record(0.1 * i, ("x", i))
    histogram.record(9.0, ("x", 0))  # a known set still counts in its own point
    points = {tuple(sorted(p.attributes.items())): p.count
              for p in reader.get_metrics_data().resource_metrics[0].scope_metrics[1].metrics[0].data.data_points}
    assert points == {(("a", "x"), ("b", 0)): 2, (("a", "x"), ("b", 1)): 1, (("a", "x"), ("b", 2)): 1,
                      (("otel.metric.overflow", True),): 3}


def test_the_histograms_join_the_scope_of_the_other_instruments() -> None:
    histogram = h.Histogram(METRIC, BOUNDS)
    reader = InMemoryMetricReader()
    h.Histograms([histogram], SCOPE, Resource.create({})).attach(reader)
    MeterProvider(metric_readers=[reader]).get_meter(SCOPE.name, SCOPE.version).create_counter("other").add(2)
    histogram.record(0.7, ("y", None))
    data = reader.get_metrics_data()
    assert [[m.name for m in s.metrics] for s in data.resource_metrics[0].scope_metrics] == [["other", METRIC.name]]


def test_with_nothing_recorded_nothing_is_added() -> None:
    reader = InMemoryMetricReader()
    h.Histograms([h.Histogram(METRIC, BOUNDS)], SCOPE, Resource.create({})).attach(reader)
    MeterProvider(metric_readers=[reader]).get_meter("other").create_counter("c").add(1)
    assert [s.scope.name for s in reader.get_metrics_data().resource_metrics[0].scope_metrics] == ["other"]


@pytest.mark.parametrize(("aggregation", "ours"), [
    (None, True),
    (ExplicitBucketHistogramAggregation(), True),  # what the OTLP exporters ask for by default
    (ExplicitBucketHistogramAggregation([1.0, 2.0]), False),
    (ExplicitBucketHistogramAggregation(record_min_max=False), False),
    (ExponentialBucketHistogramAggregation(), False),
])
def test_which_readers_get_our_histograms(aggregation: Any, ours: bool) -> None:
    reader = InMemoryMetricReader(preferred_aggregation={SdkHistogram: aggregation} if aggregation else None)
    assert h.aggregates_like_us(reader) is ours


def test_a_reader_that_wants_exponential_histograms_gets_them_from_the_sdk() -> None:
    reader = InMemoryMetricReader(preferred_aggregation={SdkHistogram: ExponentialBucketHistogramAggregation()})
    telemetry = Telemetry(metric_readers=[reader])
    assert telemetry.instruments is not None
    telemetry.instruments.request_duration.record(0.02, ("GET", 200, None, "2", "https", "direct"))
    data = reader.get_metrics_data()
    assert data is not None
    [metric] = [m for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics
                if m.name == n.HTTP_CLIENT_REQUEST_DURATION.name]
    assert isinstance(metric.data, ExponentialHistogram)
    [point] = metric.data.data_points
    assert point.count == 1 and dict(point.attributes or {}) == {
        n.HTTP_REQUEST_METHOD: "GET", n.HTTP_RESPONSE_STATUS_CODE: 200, n.NETWORK_PROTOCOL_VERSION: "2",
        n.URL_SCHEME: "https", n.POOL_NAME: "direct"}
    telemetry.shutdown(1.0)
