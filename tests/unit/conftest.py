"""Telemetry over the SDK's in-memory exporter and reader, for the unit tests that watch spans and metrics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fetchpool.telemetry import names as n
from fetchpool.telemetry.setup import Telemetry
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def phases() -> str:
    """How phases are exported; tests parametrize it to check both ways."""
    return n.PHASES_AS_EVENTS


@pytest.fixture
def telemetry(spans: InMemorySpanExporter, reader: InMemoryMetricReader, phases: str) -> Iterator[Telemetry]:
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    telemetry = Telemetry(tracer_provider=tracer_provider, metric_readers=[reader], phases=phases)
    yield telemetry
    telemetry.shutdown(1.0)
