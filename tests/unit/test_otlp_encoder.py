"""fetchpool's OTLP span encoder writes exactly what the SDK's encoder serializes."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest
from fetchpool.telemetry._otlp_encoder import CACHE_LIMIT, SpanEncoder
from fetchpool.telemetry.spans import RecordedSpan
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_SCALAR = st.one_of(st.none(), st.booleans(), st.text(max_size=40), _INT64, st.floats(), st.binary(max_size=20))
_VALUE = st.recursive(_SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner),
    st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
_ATTRIBUTES = st.dictionaries(st.text(max_size=30), _VALUE, max_size=8)
_ID64 = st.integers(min_value=1, max_value=2**64 - 1)
_ID128 = st.integers(min_value=1, max_value=2**128 - 1)
_TIME = st.integers(min_value=0, max_value=2**64 - 1)
_RESOURCES = [Resource.create({"service.name": "a"}), Resource({"k": 1, "list": ["x", "y"]}, "https://schema/1")]
_SCOPES = [InstrumentationScope("fetchpool", "1.2.3"),
           InstrumentationScope("other", None, "https://schema/2", {"a": 1}), None]


@st.composite
def _context(draw: st.DrawFn, remote: bool | None = None) -> SpanContext:
    state = draw(st.sampled_from([None, TraceState([("vendor", "value"), ("other", "1")])]))
    return SpanContext(draw(_ID128), draw(_ID64), is_remote=draw(st.booleans()) if remote is None else remote,
                       trace_flags=TraceFlags(1), trace_state=state)


@st.composite
def _span(draw: st.DrawFn) -> ReadableSpan:
    events = [Event(draw(st.text(max_size=20)), draw(st.none() | _ATTRIBUTES), draw(_TIME))
              for _ in range(draw(st.integers(0, 4)))]
    links = [Link(draw(_context()), draw(st.none() | _ATTRIBUTES)) for _ in range(draw(st.integers(0, 2)))]
    status = draw(st.sampled_from([Status(StatusCode.UNSET), Status(StatusCode.OK),
                                   Status(StatusCode.ERROR, draw(st.text(max_size=30)))]))
    return ReadableSpan(
        name=draw(st.text(max_size=30)), context=draw(_context(remote=False)),
        parent=draw(st.none() | _context()), resource=draw(st.sampled_from(_RESOURCES)),
        attributes=draw(_ATTRIBUTES), events=events, links=links, kind=draw(st.sampled_from(list(SpanKind))),
        status=status, start_time=draw(_TIME), end_time=draw(_TIME),
        instrumentation_scope=draw(st.sampled_from(_SCOPES)))


@settings(max_examples=300, deadline=None)
@given(st.lists(_span(), max_size=6))
def test_the_bytes_are_the_sdk_encoders(spans: list[ReadableSpan]) -> None:
    encoder = SpanEncoder()
    expected = encode_spans(spans).SerializeToString()
    assert encoder.encode(spans) == expected
    assert encoder.encode(spans) == expected  # again, now from the encoder's caches


def _fetch_span(index: int, resource: Resource) -> ReadableSpan:
    """A span like a fetch's: attributes that repeat and one that does not."""
    return ReadableSpan(
        name="GET", context=SpanContext(index + 1, index + 1, is_remote=False), kind=SpanKind.CLIENT,
        resource=resource, start_time=index, end_time=index + 10,
        attributes={"http.request.method": "GET", "url.full": f"https://127.0.0.1/?i={index}",
                    "server.port": 443, "fetchpool.connection.reused": True},
        events=[Event("pool.acquire", {"fetchpool.phase.duration": index / 7, "fetchpool.pool.name": "direct"}, index)])


def test_the_attribute_cache_stays_bounded_and_correct() -> None:
    encoder = SpanEncoder()
    resource = Resource.create({})
    spans = [_fetch_span(i, resource) for i in range(3 * CACHE_LIMIT)]
    for start in range(0, len(spans), 512):
        batch = spans[start:start + 512]
        assert encoder.encode(batch) == encode_spans(batch).SerializeToString()
        assert len(encoder._attributes) <= CACHE_LIMIT


def test_spans_of_distinct_resources_and_scopes_are_grouped() -> None:
    one, two = Resource({"service.name": "one"}), Resource({"service.name": "two"})
    spans = [_fetch_span(0, one), _fetch_span(1, two), _fetch_span(2, one)]
    request = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    assert [len(r.scope_spans[0].spans) for r in request.resource_spans] == [2, 1]
    assert [r.resource.attributes[0].value.string_value for r in request.resource_spans] == ["one", "two"]


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, object(), [1, object()], "\ud800"])
def test_values_otlp_cannot_carry_are_left_out_and_logged(value: Any, caplog: pytest.LogCaptureFixture) -> None:
    span = ReadableSpan(name="x", context=SpanContext(1, 2, is_remote=False), resource=Resource({}),
                        attributes={"good": 1, "bad": value}, start_time=1, end_time=2)
    with caplog.at_level(logging.ERROR):
        encoded = SpanEncoder().encode([span])
    received = ExportTraceServiceRequest.FromString(encoded).resource_spans[0].scope_spans[0].spans[0]
    assert [kv.key for kv in received.attributes] == ["good"]
    assert "bad" in caplog.text


def test_floats_keep_their_bits() -> None:
    span = ReadableSpan(name="x", context=SpanContext(1, 2, is_remote=False), resource=Resource({}),
                        attributes={"nan": math.nan, "inf": -math.inf, "tiny": 5e-324}, start_time=1, end_time=2)
    assert SpanEncoder().encode([span]) == encode_spans([span]).SerializeToString()


def test_recorded_spans_show_their_phases_to_every_exporter() -> None:
    resource = Resource.create({})
    phases = (("pool.acquire", 5, (("fetchpool.pool.name", "direct"), ("fetchpool.phase.duration", 0.25))),
              ("response.body", 7, (("http.response.body.size", 2048), ("fetchpool.phase.failed", True))))
    span = RecordedSpan(name="GET", context=SpanContext(1, 2, is_remote=False), resource=resource,
                        attributes={"url.full": "https://127.0.0.1/"}, start_time=1, end_time=9, phase_events=phases)
    # The encoder's path for the phase tuples writes what the SDK's encoder makes of the SDK events.
    assert SpanEncoder().encode([span]) == encode_spans([span]).SerializeToString()
    assert [(e.name, e.timestamp, dict(e.attributes or {})) for e in span.events] == [
        ("pool.acquire", 5, {"fetchpool.pool.name": "direct", "fetchpool.phase.duration": 0.25}),
        ("response.body", 7, {"http.response.body.size": 2048, "fetchpool.phase.failed": True})]
    shown = json.loads(span.to_json())  # what the console exporter prints
    assert [e["name"] for e in shown["events"]] == ["pool.acquire", "response.body"]
    assert shown["events"][0]["attributes"]["fetchpool.phase.duration"] == 0.25


@contextlib.contextmanager
def _kept_apart(*names: str) -> Iterator[list[logging.LogRecord]]:
    """The records of loggers ``names``, kept out of pytest's report: a lone surrogate in a
    report cannot be sent from an xdist worker (execnet encodes it as UTF-8), which crashes the run."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
            logger.propagate = True


def test_an_attribute_that_cannot_be_encoded_never_costs_the_rest() -> None:
    loop: list[Any] = []
    loop.append(loop)
    span = ReadableSpan(name="x", context=SpanContext(1, 2, is_remote=False), resource=Resource({}),
                        attributes={"good": 1, "\ud800": 1.5, "loop": loop, "after": "kept"}, start_time=1, end_time=2)
    sdk = "opentelemetry.exporter.otlp.proto.common._internal"
    with _kept_apart("fetchpool.telemetry._otlp_encoder", sdk) as logged:
        encoded = SpanEncoder().encode([span])
        expected = encode_spans([span]).SerializeToString()
    received = ExportTraceServiceRequest.FromString(encoded).resource_spans[0].scope_spans[0].spans[0]
    assert [kv.key for kv in received.attributes] == ["good", "after"]
    assert encoded == expected
    ours = [r.getMessage() for r in logged if r.name.startswith("fetchpool.")]
    assert [m.split(":")[0] for m in ours] == ["Failed to encode key '\\ud800'", "Failed to encode key 'loop'"]


def test_scopes_equal_by_name_but_not_by_attributes_keep_their_own() -> None:
    encoder = SpanEncoder()
    for attributes in ({"a": 1}, {"a": 2}):
        scope = InstrumentationScope("same", "1", None, attributes)
        span = ReadableSpan(name="x", context=SpanContext(1, 2, is_remote=False), resource=Resource({}),
                            start_time=1, end_time=2, instrumentation_scope=scope)
        assert encoder.encode([span]) == encode_spans([span]).SerializeToString()
