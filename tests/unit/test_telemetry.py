"""Fetch telemetry with the SDK's in-memory exporters, against the real nginx / tinyproxy / app server:
the span tree, attribute names and values, phase timings, reuse, redaction, and the metrics."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fetchpool.config import FetchSettings, PoolLimits, Settings
from fetchpool.engine import Engine, FetchSpec, Outcome
from fetchpool.telemetry import fetches
from fetchpool.telemetry import names as n
from fetchpool.telemetry.setup import Telemetry
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode
from support import AppServer, Certs, Nginx, Tinyproxy

LOOPBACK = ("127.0.0.0/8", "::1/128")  # the SSRF guard refuses the test servers otherwise
PHASES = {"pool.acquire", "tcp.connect", "proxy.connect", "tls.handshake", "request.send", "response.headers",
          "response.body"}


def _settings(certs: Certs, proxies: tuple[str, ...] = (), **limits: Any) -> Settings:
    return Settings(limits=PoolLimits().replace(**limits), fetch=FetchSettings(
        ca_bundle=str(certs.ca_pem), proxies=proxies, allow_targets=LOOPBACK))


@asynccontextmanager
async def _engine(telemetry: Telemetry, settings: Settings) -> AsyncIterator[Engine]:
    async with Engine(settings, observer=telemetry.observer) as engine:
        telemetry.attach(engine)
        yield engine


def _client_spans(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    return sorted((s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT), key=lambda s: s.start_time)


def _children(spans: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    return sorted((s for s in spans.get_finished_spans() if s.parent and s.parent.span_id == parent.context.span_id),
                  key=lambda s: s.start_time)


def _phases(spans: InMemorySpanExporter, client: ReadableSpan) -> list[tuple[str, int, int, dict[str, Any]]]:
    """``(name, start_ns, end_ns, attributes)`` of a fetch's phases, from its events or its child spans."""
    children = _children(spans, client)
    if children:
        assert not client.events
        assert all(c.kind is SpanKind.INTERNAL for c in children)
        return [(c.name, c.start_time or 0, c.end_time or 0, dict(c.attributes or {})) for c in children]
    found = []
    for event in client.events:
        attributes = dict(event.attributes or {})
        duration = attributes.pop(n.PHASE_DURATION)
        assert duration >= 0
        found.append((event.name, event.timestamp, event.timestamp + round(duration * 1e9), attributes))
    return found


def _metrics(reader: InMemoryMetricReader) -> dict[str, Any]:
    """name -> (unit, data points) of one collection."""
    found: dict[str, Any] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                found[metric.name] = (metric.unit, list(metric.data.data_points))
    return found


def _phase_seconds(phase: tuple[str, int, int, dict[str, Any]]) -> float:
    return (phase[2] - phase[1]) / 1e9


def _seconds(span: ReadableSpan) -> float:
    assert span.start_time is not None and span.end_time is not None
    return (span.end_time - span.start_time) / 1e9


@pytest.mark.parametrize("phases", [n.PHASES_AS_EVENTS, n.PHASES_AS_SPANS])
async def test_a_fetch_is_a_client_span_with_its_phases(
    telemetry: Telemetry, spans: InMemorySpanExporter, nginx: Nginx, certs: Certs, phases: str
) -> None:
    tracer = telemetry.tracer_provider.get_tracer("caller")  # type: ignore[union-attr]
    url = f"{nginx.https_url}/small.html?t=tree"
    async with _engine(telemetry, _settings(certs)) as engine:
        with tracer.start_as_current_span("caller") as caller:
            first_outcome = await engine.fetch(FetchSpec(url=url))
            second_outcome = await engine.fetch(FetchSpec(url=url))
    assert first_outcome.ok and second_outcome.ok
    one, two = _client_spans(spans)
    for span, outcome in ((one, first_outcome), (two, second_outcome)):
        assert span.name == "GET" and span.kind is SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id == caller.get_span_context().span_id
        assert span.context.trace_id == caller.get_span_context().trace_id
        assert span.status.status_code is StatusCode.UNSET
        attributes = dict(span.attributes or {})
        assert attributes == {
            n.HTTP_REQUEST_METHOD: "GET",
            n.URL_FULL: url,
            n.SERVER_ADDRESS: "127.0.0.1",
            n.SERVER_PORT: nginx.https_port,
            n.HTTP_RESPONSE_STATUS_CODE: 200,
            n.NETWORK_PROTOCOL_VERSION: "2",
            n.POOL_NAME: "direct",
            n.CONNECTION_REUSED: outcome.connection_reused,
        }
    assert (one.attributes or {})[n.CONNECTION_REUSED] is False
    assert (two.attributes or {})[n.CONNECTION_REUSED] is True
    first = _phases(spans, one)
    assert [p[0] for p in first] == ["pool.acquire", "tcp.connect", "tls.handshake", "request.send",
                                     "response.headers", "response.body"]
    assert [p[0] for p in _phases(spans, two)] == ["pool.acquire", "request.send", "response.headers",
                                                   "response.body"]
    acquire, _, tls = first[:3]
    assert acquire[3] == {n.POOL_NAME: "direct"}
    assert tls[3] == {n.TLS_NEXT_PROTOCOL: "h2", n.TLS_PROTOCOL_NAME: "tls", n.TLS_PROTOCOL_VERSION: "1.3"}
    assert first[-1][3] == {n.HTTP_RESPONSE_BODY_SIZE: len(first_outcome.body)}
    if phases == n.PHASES_AS_SPANS:
        assert len(spans.get_finished_spans()) == 1 + 2 + 6 + 4
    else:
        assert len(spans.get_finished_spans()) == 1 + 2


def _check_timings(spans: InMemorySpanExporter, span: ReadableSpan, outcome: Outcome) -> None:
    phases = _phases(spans, span)
    assert span.start_time is not None and span.end_time is not None
    for name, start, end, _ in phases:
        assert span.start_time <= start <= end <= span.end_time, name
    total = {name: sum(_phase_seconds(p) for p in phases if p[0] == name) for name in PHASES}
    timings = outcome.timings
    for name, value in (("pool.acquire", timings.pool_wait), ("tcp.connect", timings.connect),
                        ("proxy.connect", timings.proxy_connect), ("tls.handshake", timings.tls),
                        ("response.headers", timings.ttfb)):
        assert value >= 0 and total[name] == pytest.approx(value, abs=1e-6), name
    assert _seconds(span) == pytest.approx(timings.total, abs=2e-3)
    assert _seconds(span) >= sum(total.values()) - 1e-6


@pytest.mark.parametrize("phases", [n.PHASES_AS_EVENTS, n.PHASES_AS_SPANS])
async def test_phase_timings_are_non_negative_and_match_the_result(
    telemetry: Telemetry, spans: InMemorySpanExporter, nginx: Nginx, app_server: AppServer, certs: Certs
) -> None:
    async with _engine(telemetry, _settings(certs)) as engine:
        outcomes = [await engine.fetch(FetchSpec(url=url)) for url in (
            f"{nginx.https_url}/large.html?t=timings", f"{nginx.http_url}/small.html?t=timings",
            f"{app_server.https_url}/delay?s=0.05", f"{app_server.https_url}/redirect/2")]
    assert all(o.ok for o in outcomes)
    for span, outcome in zip(_client_spans(spans), outcomes, strict=True):
        _check_timings(spans, span, outcome)
    redirected = _client_spans(spans)[-1]
    assert (redirected.attributes or {})[n.HTTP_REQUEST_RESEND_COUNT] == 2
    assert [p[0] for p in _phases(spans, redirected)].count("request.send") == 3


@pytest.mark.parametrize("phases", [n.PHASES_AS_EVENTS, n.PHASES_AS_SPANS])
async def test_through_a_proxy_the_connect_is_a_phase_and_credentials_never_leave(
    telemetry: Telemetry, spans: InMemorySpanExporter, reader: InMemoryMetricReader, tinyproxy: Tinyproxy,
    nginx: Nginx, certs: Certs
) -> None:
    proxy = tinyproxy.url.replace("://", "://alice:s3cr3t-pw@")
    async with _engine(telemetry, _settings(certs, proxies=(proxy,))) as engine:
        outcome = await engine.fetch(FetchSpec(url=f"{nginx.https_url}/small.html?via=proxy"))
        metrics = _metrics(reader)
    assert outcome.ok, outcome.error_message
    [span] = _client_spans(spans)
    names = [p[0] for p in _phases(spans, span)]
    assert names[:4] == ["pool.acquire", "tcp.connect", "proxy.connect", "tls.handshake"]
    _check_timings(spans, span, outcome)
    pool = (span.attributes or {})[n.POOL_NAME]
    assert pool == outcome.pool and tinyproxy.url.split("://")[1] in pool
    exported = repr([(s.name, dict(s.attributes or {}), [dict(e.attributes or {}) for e in s.events])
                     for s in spans.get_finished_spans()]) + repr(metrics)
    assert "s3cr3t-pw" not in exported and "alice" not in exported


async def test_url_credentials_and_signatures_are_redacted(
    telemetry: Telemetry, spans: InMemorySpanExporter, nginx: Nginx, certs: Certs
) -> None:
    host = nginx.https_url.split("://")[1]
    url = f"https://bob:hunter2@{host}/small.html?x=1&Signature=abc%2F&X-Goog-Signature=def&sig=ghi#frag"
    async with _engine(telemetry, _settings(certs)) as engine:
        assert (await engine.fetch(FetchSpec(url=url))).ok
    [span] = _client_spans(spans)
    assert (span.attributes or {})[n.URL_FULL] == (
        f"https://REDACTED:REDACTED@{host}/small.html?x=1&Signature=REDACTED&X-Goog-Signature=REDACTED"
        "&sig=REDACTED#frag")
    exported = repr([dict(s.attributes or {}) for s in spans.get_finished_spans()])
    assert "hunter2" not in exported and "bob" not in exported and "abc" not in exported


async def test_failures_set_error_type_and_status(
    telemetry: Telemetry, spans: InMemorySpanExporter, reader: InMemoryMetricReader, app_server: AppServer,
    certs: Certs
) -> None:
    async with _engine(telemetry, _settings(certs)) as engine:
        invalid = await engine.fetch(FetchSpec(url="ftp://example.com/x"))
        missing = await engine.fetch(FetchSpec(url=f"{app_server.https_url}/status/404"))
        odd = await engine.fetch(FetchSpec(url=f"{app_server.https_url}/echo", method="PURGE"))
        metrics = _metrics(reader)
    assert invalid.error_kind is not None and missing.status_code == 404 and odd.status_code == 200
    bad, not_found, other = _client_spans(spans)
    assert (bad.attributes or {})[n.ERROR_TYPE] == "INVALID_URL"
    assert bad.status.status_code is StatusCode.ERROR and bad.status.description
    assert _phases(spans, bad) == []
    assert (not_found.attributes or {})[n.ERROR_TYPE] == "404"
    assert not_found.status.status_code is StatusCode.ERROR
    assert other.name == "HTTP"
    assert (other.attributes or {})[n.HTTP_REQUEST_METHOD] == "_OTHER"
    assert (other.attributes or {})[n.HTTP_REQUEST_METHOD_ORIGINAL] == "PURGE"
    _, points = metrics[n.HTTP_CLIENT_REQUEST_DURATION.name]
    errors = {p.attributes.get(n.ERROR_TYPE) for p in points}
    assert {"INVALID_URL", "404", None} <= errors


async def test_metrics_have_the_documented_names_units_and_pool_attribute(
    telemetry: Telemetry, reader: InMemoryMetricReader, nginx: Nginx, certs: Certs
) -> None:
    async with _engine(telemetry, _settings(certs, max_connections=7, max_keepalive_connections=5)) as engine:
        for i in range(3):
            assert (await engine.fetch(FetchSpec(url=f"{nginx.https_url}/small.html?m={i}"))).ok
        metrics = _metrics(reader)
    documented = {m.name: m for m in n.METRICS}
    assert set(metrics) <= set(documented)
    # Recorded so far (no connection closed and no pool timeout yet, so not those two).
    expected = set(documented) - {n.HTTP_CLIENT_CONNECTION_DURATION.name, n.TELEMETRY_DROPPED.name,
                                  n.RPC_SERVER_CALL_DURATION.name}
    assert expected <= set(metrics), expected - set(metrics)
    for name, (unit, points) in metrics.items():
        assert unit == documented[name].unit, name
        for point in points:
            assert set(point.attributes) <= set(documented[name].attributes), (name, point.attributes)
    _, [duration] = metrics[n.HTTP_CLIENT_REQUEST_DURATION.name]
    assert duration.count == 3
    assert dict(duration.attributes) == {n.HTTP_REQUEST_METHOD: "GET", n.URL_SCHEME: "https", n.POOL_NAME: "direct",
                                         n.HTTP_RESPONSE_STATUS_CODE: 200, n.NETWORK_PROTOCOL_VERSION: "2"}
    _, [waits] = metrics[n.POOL_WAIT_TIME.name]
    assert waits.count == 3 and dict(waits.attributes) == {n.POOL_NAME: "direct"}
    _, [created] = metrics[n.POOL_CONNECTION_CREATE_TIME.name]
    assert created.count == 1 and created.attributes[n.NETWORK_PROTOCOL_VERSION] == "2"
    value = {name: {tuple(sorted(p.attributes.items())): p.value for p in points}
             for name, (_, points) in metrics.items() if name not in (
                 n.HTTP_CLIENT_REQUEST_DURATION.name, n.POOL_WAIT_TIME.name, n.POOL_CONNECTION_CREATE_TIME.name)}
    pool = ((n.POOL_NAME, "direct"),)
    assert value[n.POOL_CONNECTION_MAX.name] == {pool: 7}
    assert value[n.POOL_CONNECTION_IDLE_MAX.name] == {pool: 5}
    assert value[n.POOL_CONNECTIONS_CREATED.name] == {pool: 1}
    assert value[n.HTTP_CLIENT_ACTIVE_REQUESTS.name] == {pool: 0}
    assert value[n.POOL_PENDING_REQUESTS.name] == {pool: 0}
    assert value[n.DEMAND.name] == {(): 0}
    assert value[n.HTTP_CLIENT_OPEN_CONNECTIONS.name] == {
        (*pool, (n.HTTP_CONNECTION_STATE, "active")): 0, (*pool, (n.HTTP_CONNECTION_STATE, "idle")): 1}


@pytest.mark.parametrize("phases", [n.PHASES_AS_EVENTS, n.PHASES_AS_SPANS])
async def test_a_small_pool_shows_as_demand_pending_requests_and_long_pool_waits(
    telemetry: Telemetry, spans: InMemorySpanExporter, reader: InMemoryMetricReader, app_server: AppServer,
    certs: Certs
) -> None:
    async with _engine(telemetry, _settings(certs, max_connections=1, max_requests=1)) as engine:
        fetches = [asyncio.create_task(engine.fetch(FetchSpec(url=f"{app_server.https_url}/delay?s=0.3&i={i}")))
                   for i in range(3)]
        for _ in range(50):  # read while the first fetch waits for its answer (0.3 s), not after
            await asyncio.sleep(0.02)
            during = _metrics(reader)
            if [p.value for p in during.get(n.DEMAND.name, ("", []))[1]] == [3]:
                break
        outcomes = await asyncio.gather(*fetches)
    assert all(o.ok for o in outcomes)
    pool = {n.POOL_NAME: "direct"}
    assert [p.value for p in during[n.DEMAND.name][1]] == [3]
    assert [(dict(p.attributes), p.value) for p in during[n.POOL_PENDING_REQUESTS.name][1]] == [(pool, 2)]
    assert [(dict(p.attributes), p.value) for p in during[n.HTTP_CLIENT_ACTIVE_REQUESTS.name][1]] == [(pool, 1)]
    waits = sorted(_phase_seconds(p) for s in _client_spans(spans) for p in _phases(spans, s) if p[0] == "pool.acquire")
    # The first waits for nothing but its turn in the loop; each other one for a 0.3 s answer more.
    assert waits[0] < 0.25 and waits[1] > 0.25 and waits[2] > 0.55


async def test_pool_timeouts_are_counted(
    telemetry: Telemetry, reader: InMemoryMetricReader, app_server: AppServer, certs: Certs
) -> None:
    async with _engine(telemetry, _settings(certs, max_connections=1, max_requests=1, pool_timeout=0.1)) as engine:
        slow = asyncio.create_task(engine.fetch(FetchSpec(url=f"{app_server.https_url}/delay?s=0.5")))
        await asyncio.sleep(0.05)
        starved = await engine.fetch(FetchSpec(url=f"{app_server.https_url}/delay?s=0"))
        await slow
        metrics = _metrics(reader)
    assert starved.error_kind is not None and starved.error_kind.name == "POOL_TIMEOUT"
    assert [p.value for p in metrics[n.POOL_TIMEOUTS.name][1]] == [1]


async def test_unsampled_fetches_make_no_spans_but_still_metrics(
    spans: InMemorySpanExporter, reader: InMemoryMetricReader, nginx: Nginx, certs: Certs
) -> None:
    tracer_provider = TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    telemetry = Telemetry(tracer_provider=tracer_provider,
                          metric_readers=[reader])
    async with _engine(telemetry, _settings(certs)) as engine:
        assert (await engine.fetch(FetchSpec(url=f"{nginx.https_url}/small.html"))).ok
        metrics = _metrics(reader)
    assert spans.get_finished_spans() == ()
    assert metrics[n.HTTP_CLIENT_REQUEST_DURATION.name][1][0].count == 1
    telemetry.shutdown(1.0)


async def test_metrics_only_and_traces_only(spans: InMemorySpanExporter, nginx: Nginx, certs: Certs) -> None:
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    for telemetry in (Telemetry(tracer_provider=tracer_provider), Telemetry(metric_readers=[InMemoryMetricReader()])):
        async with _engine(telemetry, _settings(certs)) as engine:
            assert (await engine.fetch(FetchSpec(url=f"{nginx.https_url}/small.html"))).ok
        telemetry.shutdown(1.0)
    assert len(_client_spans(spans)) == 1


def test_connection_closes_reported_by_the_engine_are_recorded(
    telemetry: Telemetry, reader: InMemoryMetricReader
) -> None:
    telemetry.observer.connection_closed("direct", 12.5, "HTTP/2")
    _, [point] = _metrics(reader)[n.HTTP_CLIENT_CONNECTION_DURATION.name]
    assert point.count == 1 and point.sum == 12.5
    assert dict(point.attributes) == {n.POOL_NAME: "direct", n.NETWORK_PROTOCOL_VERSION: "2"}


def test_a_broken_observer_never_breaks_a_fetch(telemetry: Telemetry, caplog: pytest.LogCaptureFixture) -> None:
    outcome = Outcome(url="https://example.com/")
    telemetry.observer.fetch_finished(object(), outcome, None)  # not a token: an internal error
    telemetry.observer.fetch_finished(object(), outcome, None)
    assert sum("fetch telemetry failed" in r.getMessage() for r in caplog.records) == 1



def test_finished_fetches_become_spans_in_batches(telemetry: Telemetry, spans: InMemorySpanExporter) -> None:
    observer = telemetry.observer
    tokens = [observer.fetch_started(FetchSpec(url=f"https://127.0.0.1/{i}")) for i in range(fetches.BATCH + 2)]
    for i, token in enumerate(tokens):
        observer.fetch_finished(token, Outcome(url=f"https://127.0.0.1/{i}", status_code=200), None)
        made = len(_client_spans(spans))
        if i < fetches.BATCH - 1:
            assert made == 0
        elif i < fetches.BATCH + 1:
            assert made == fetches.BATCH  # a full batch, while fetches are still in flight
        else:
            assert made == fetches.BATCH + 2  # the last one in flight finished
    assert [(s.attributes or {})[n.URL_FULL] for s in _client_spans(spans)] == \
        [f"https://127.0.0.1/{i}" for i in range(fetches.BATCH + 2)]


async def test_the_engines_upkeep_delivers_what_waits_behind_a_slow_fetch(
    telemetry: Telemetry, spans: InMemorySpanExporter, nginx: Nginx, app_server: AppServer, certs: Certs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flushes = 0  # by the engine's upkeep
    flush = telemetry.observer.flush

    def counted() -> None:
        nonlocal flushes
        flushes += sys._getframe(1).f_code.co_name == "_tend"
        flush()

    monkeypatch.setattr(telemetry.observer, "flush", counted)
    async with _engine(telemetry, _settings(certs)) as engine:
        slow = asyncio.create_task(engine.fetch(FetchSpec(url=f"{app_server.https_url}/delay?s=4")))
        await asyncio.sleep(0.2)
        before = flushes
        quick = [await engine.fetch(FetchSpec(url=f"{nginx.https_url}/small.html?quick={i}")) for i in range(3)]
        assert all(o.ok for o in quick)
        if flushes == before:  # (a loaded machine may reach the upkeep's second meanwhile)
            assert _client_spans(spans) == []  # held back while a fetch is in flight ...
        for _ in range(30):  # ... until the engine's per-second upkeep asks for them
            await asyncio.sleep(0.1)
            if _client_spans(spans):
                break
        assert len(_client_spans(spans)) == 3 and not slow.done()
        assert (await slow).ok
    assert len(_client_spans(spans)) == 4
