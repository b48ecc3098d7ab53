"""Spans that already happened, recorded in one step.

The SDK has no call for "this span ran from t0 to t1"; ``start_span(start_time=...)`` then
``end(end_time=...)`` does it, but builds a live span (a lock, attribute validation, a copy at
the end): about 50 µs per fetch with its phase events, on the event loop. This module makes the
same :class:`~opentelemetry.sdk.trace.ReadableSpan` the SDK would, with the tracer's own
sampler, id generator, resource and span processor, in about 7 µs. Differences from live
spans: span processors get ``on_end`` only (never ``on_start``), attributes a sampler would add
are not added, and span limits are not applied (our attributes are few and bounded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags.SAMPLED
_RANDOM = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)  # W3C trace context level 2 (SDK >= 1.4x)
# The two flag values a sampled span of ours can have, made once (each TraceFlags is an object
# the garbage collector tracks for as long as its span waits for export).
_FLAGS = {0: TraceFlags(_SAMPLED), _RANDOM: TraceFlags(_SAMPLED | _RANDOM)}

__all__ = ["UNSET", "FinishedSpans", "PhaseEvent", "RecordedSpan"]


#: A span event as plain data: its name, time (ns since the epoch) and attributes as (key, value)
#: pairs. Plain tuples of str and numbers, which the garbage collector stops tracking: a span waits
#: in the export queue long enough to reach the oldest generation, where every tracked object it
#: holds adds to the cost of full collections.
PhaseEvent = tuple[str, int, tuple[tuple[str, Any], ...]]


class RecordedSpan(ReadableSpan):
    """A finished span whose events are kept as :data:`PhaseEvent` tuples.

    fetchpool's OTLP encoder reads :attr:`phase_events` directly; the SDK's
    :class:`~opentelemetry.sdk.trace.Event` objects (and their dicts) are made only for whoever
    reads :attr:`events`, on that reader's thread (the console exporter, tests).
    """

    def __init__(self, *args: Any, phase_events: tuple[PhaseEvent, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase_events = phase_events

    @property
    def events(self) -> Sequence[Event]:
        if self.phase_events and not self._events:
            self._events = tuple(Event(name, dict(pairs), time) for name, time, pairs in self.phase_events)
        return tuple(self._events)

    def to_json(self, indent: int | None = 4) -> str:
        self.events  # noqa: B018 -- made now: the SDK's to_json reads the private list
        return super().to_json(indent)

    @property
    def dropped_events(self) -> int:
        return 0


class FinishedSpans:
    """Records finished spans through an SDK tracer's pipeline."""

    def __init__(self, tracer: SdkTracer, scope: InstrumentationScope) -> None:
        self._sampler = tracer.sampler
        self._ids = tracer.id_generator
        self._processor = tracer.span_processor
        self._resource = tracer.resource
        self._scope = scope

    def record(
        self,
        name: str,
        kind: SpanKind,
        parent: context_api.Context | None,
        attributes: dict[str, Any],
        start_ns: int,
        end_ns: int,
        status: Status = UNSET,
        events: tuple[PhaseEvent, ...] = (),
    ) -> SpanContext | None:
        """A span under the current span of ``parent`` (a root without one), if the sampler
        keeps it; returns its context (for children) or None when it was not sampled."""
        parent_context: SpanContext | None = trace.get_current_span(parent).get_span_context()
        if parent_context is not None and parent_context.is_valid:
            trace_id = parent_context.trace_id
            random = parent_context.trace_flags & _RANDOM
        else:
            parent_context = None
            trace_id = self._ids.generate_trace_id()
            random = _RANDOM if self._ids.is_trace_id_random() else 0
        result = self._sampler.should_sample(parent, trace_id, name, kind, attributes)
        if not result.decision.is_sampled():
            return None
        context = SpanContext(trace_id, self._ids.generate_span_id(), is_remote=False,
                              trace_flags=_FLAGS[random], trace_state=result.trace_state)
        self._processor.on_end(RecordedSpan(
            name, context, parent_context, self._resource, attributes, (), (), kind, None, status,
            start_ns, end_ns, self._scope, phase_events=events))
        return context

    def record_child(
        self,
        name: str,
        parent: SpanContext,
        attributes: dict[str, Any],
        start_ns: int,
        end_ns: int,
        status: Status = UNSET,
    ) -> None:
        """An INTERNAL span under the sampled span ``parent`` (children share its sampling decision)."""
        context = SpanContext(parent.trace_id, self._ids.generate_span_id(), is_remote=False,
                              trace_flags=parent.trace_flags, trace_state=parent.trace_state)
        self._processor.on_end(ReadableSpan(
            name, context, parent, self._resource, attributes, (), (), SpanKind.INTERNAL, None, status,
            start_ns, end_ns, self._scope))
