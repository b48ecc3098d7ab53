"""Finished spans straight to OTLP protobuf bytes (an ``ExportTraceServiceRequest``).

The SDK's encoder (``opentelemetry.exporter.otlp.proto.common.trace_encoder``) builds a
protobuf object per span, event, attribute and value, then serializes them: about 50 µs per
fetch span with its phase events, on an export thread that holds the GIL against the event
loop. This module writes the same message in protobuf's wire format directly and reuses the
encoding of the attributes that repeat from span to span (method, pool, host, port, status,
protocol): a few µs per span. Its output parses to the message the SDK's encoder builds
(``tests/unit/test_otlp_encoder.py`` checks it against that encoder); the one difference is
that spans of equal but distinct :class:`~opentelemetry.sdk.resources.Resource` objects go in
separate ``ResourceSpans``, which OTLP allows.

Wire format: https://protobuf.dev/programming-guides/encoding/; message layout:
``opentelemetry/proto/trace/v1/trace.proto``, ``common/v1/common.proto``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

from fetchpool.telemetry.spans import RecordedSpan

logger = logging.getLogger(__name__)

__all__ = ["SpanEncoder"]

#: Attribute encodings kept for reuse; the cache is emptied when it grows past this (per-span
#: values such as ``url.full`` fill it; the repeating ones come back on the next spans).
CACHE_LIMIT = 4096

_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
_DOUBLE_VALUE = b"\x12\x09\x21"  # KeyValue.value: an AnyValue of 9 bytes holding double_value
_SMALL = [bytes((i,)) for i in range(128)]
_INT64 = 1 << 63
_HAS_IS_REMOTE = 0x100  # SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = 0x200  # SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


def _varint(value: int) -> bytes:
    """An unsigned varint (a negative int64 as its two's complement, 10 bytes)."""
    if 0 <= value < 128:
        return _SMALL[value]
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    size = len(payload)
    return tag + (_SMALL[size] if size < 128 else _varint(size)) + payload


def _text(tag: bytes, text: str) -> bytes:
    return _field(tag, text.encode("utf-8"))


class UnsupportedValue(TypeError):
    """An attribute value of a type OTLP has no ``AnyValue`` for (it is left out and logged)."""


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message body; the type checks in the order of the SDK's encoder."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _text(b"\x0a", value)
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise UnsupportedValue(f"integer {value} does not fit in int64")
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join([_field(b"\x0a", _any_value(v)) for v in value]))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join([_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()]))
    raise UnsupportedValue(f"invalid type {type(value).__name__} of value {value!r}")


def _key_value(key: str, value: Any) -> bytes:
    """A ``KeyValue`` message body."""
    value_field = _field(b"\x12", _any_value(value))  # in a oneof: written even when empty
    return _text(b"\x0a", key) + value_field if key else value_field


class SpanEncoder:
    """Encodes batches of finished spans; keeps the reusable attribute, resource and scope encodings
    between batches. Not thread-safe: give each exporter its own."""

    def __init__(self) -> None:
        self._attributes: dict[tuple[bytes, str, type, Any], bytes] = {}
        self._resources: dict[int, tuple[Resource, bytes]] = {}
        self._scopes: dict[int, tuple[InstrumentationScope | None, bytes]] = {}
        self._texts: dict[tuple[bytes, str], bytes] = {}
        self._keys: dict[str, bytes] = {}

    def attributes(self, tag: bytes, attributes: Iterable[tuple[str, Any]]) -> list[bytes]:
        """Each (key, value) as a ``KeyValue`` field with ``tag``; values OTLP cannot carry are logged and left out."""
        cache = self._attributes
        fields = []
        for key, value in attributes:
            kind = value.__class__
            reusable = kind is str or kind is int or kind is bool
            if reusable:
                encoded = cache.get((tag, key, kind, value))
                if encoded is not None:
                    fields.append(encoded)
                    continue
            try:
                if kind is float:  # a measurement (a phase's duration): never the same twice
                    encoded = _field(tag, self._key(key) + _DOUBLE_VALUE + _DOUBLE(value))
                else:
                    encoded = _field(tag, self._key(key) + _field(b"\x12", _any_value(value)))
            except Exception as exc:  # as the SDK's encoder: leave the attribute out, keep the rest
                logger.error("Failed to encode key %r: %s", key, exc)  # %r: a key may not be encodable text
                continue
            if reusable:
                if len(cache) >= CACHE_LIMIT:
                    cache.clear()
                cache[tag, key, kind, value] = encoded
            fields.append(encoded)
        return fields

    def _key(self, key: str) -> bytes:
        """A ``KeyValue``'s ``key`` field (nothing for an empty key, as proto3 writes it)."""
        encoded = self._keys.get(key)
        if encoded is None:
            if len(self._keys) >= CACHE_LIMIT:
                self._keys.clear()
            encoded = self._keys[key] = _text(b"\x0a", key) if key else b""
        return encoded

    def span(self, span: ReadableSpan) -> bytes:
        """A ``Span`` message body, fields in field-number order."""
        context = span.context
        assert context is not None
        parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
        if context.trace_state:
            parts.append(_text(b"\x1a", ",".join(f"{k}={v}" for k, v in context.trace_state.items())))
        parent = span.parent
        if parent is not None:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        if span.name:
            parts.append(self._repeating(b"\x2a", span.name))
        parts += (b"\x30", _SMALL[span.kind.value + 1])
        if span.start_time:  # proto3: a zero is not written
            parts += (b"\x39", _FIXED64(span.start_time))
        if span.end_time:
            parts += (b"\x41", _FIXED64(span.end_time))
        parts += self.attributes(b"\x4a", span.attributes.items() if span.attributes else ())
        if span.dropped_attributes:
            parts += (b"\x50", _varint(span.dropped_attributes))
        if isinstance(span, RecordedSpan):  # its phases as plain tuples: no SDK Event objects made
            parts += [self._event(name, timestamp, attributes, 0) for name, timestamp, attributes in span.phase_events]
        else:
            parts += [self._event(e.name, e.timestamp, e.attributes.items() if e.attributes else (),
                                  e.dropped_attributes) for e in span.events]
        if span.dropped_events:
            parts += (b"\x60", _varint(span.dropped_events))
        for link in span.links:
            body = [b"\x0a\x10", link.context.trace_id.to_bytes(16, "big"),
                    b"\x12\x08", link.context.span_id.to_bytes(8, "big")]
            body += self.attributes(b"\x22", link.attributes.items() if link.attributes else ())
            if link.dropped_attributes:
                body += (b"\x28", _varint(link.dropped_attributes))
            body += (b"\x35", _FIXED32(_flags(link.context)))
            parts.append(_field(b"\x6a", b"".join(body)))
        if span.dropped_links:
            parts += (b"\x70", _varint(span.dropped_links))
        status = span.status
        if status is not None:
            body = [_text(b"\x12", status.description)] if status.description else []
            if status.status_code.value:
                body += (b"\x18", _SMALL[status.status_code.value])
            parts.append(_field(b"\x7a", b"".join(body)))
        parts += (b"\x85\x01", _FIXED32(_flags(parent)))
        return b"".join(parts)

    def _event(self, name: str, timestamp: int, attributes: Iterable[tuple[str, Any]], dropped: int) -> bytes:
        """A span's ``events`` field."""
        body = [b"\x09", _FIXED64(timestamp)] if timestamp else []
        if name:
            body.append(self._repeating(b"\x12", name))
        body += self.attributes(b"\x1a", attributes)
        if dropped:
            body += (b"\x20", _varint(dropped))
        return _field(b"\x5a", b"".join(body))

    def _repeating(self, tag: bytes, text: str) -> bytes:
        """A string field whose values repeat (span and event names), kept once encoded."""
        encoded = self._texts.get((tag, text))
        if encoded is None:
            if len(self._texts) >= CACHE_LIMIT:
                self._texts.clear()
            encoded = self._texts[tag, text] = _text(tag, text)
        return encoded

    def resource(self, resource: Resource) -> bytes:
        """The ``resource`` field of a ``ResourceSpans`` (encoded once per Resource object)."""
        known = self._resources.get(id(resource))
        if known is None or known[0] is not resource:
            known = self._resources[id(resource)] = (
                resource, _field(b"\x0a", b"".join(self.attributes(b"\x0a", resource.attributes.items()))))
        return known[1]

    def scope(self, scope: InstrumentationScope | None) -> bytes:
        """The ``scope`` field of a ``ScopeSpans``."""
        # By object, as for resources: scopes that compare equal may still differ in attributes.
        known = self._scopes.get(id(scope))
        if known is None or known[0] is not scope:
            body = []
            if scope is not None:
                if scope.name:
                    body.append(_text(b"\x0a", scope.name))
                if scope.version:
                    body.append(_text(b"\x12", scope.version))
                body += self.attributes(b"\x1a", scope.attributes.items() if scope.attributes else ())
            known = self._scopes[id(scope)] = (scope, _field(b"\x0a", b"".join(body)))
        return known[1]

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        """``spans`` as a serialized OTLP ``ExportTraceServiceRequest``: grouped by resource, then by
        instrumentation scope. Attributes whose values OTLP cannot carry are left out with an error
        log line each, as the SDK's encoder does."""
        groups: dict[int, tuple[Resource, dict[InstrumentationScope | None, list[bytes]]]] = {}
        for span in spans:
            resource = span.resource
            group = groups.get(id(resource))
            if group is None:
                group = groups[id(resource)] = (resource, {})
            scope = span.instrumentation_scope or None
            encoded = _field(b"\x12", self.span(span))
            group[1].setdefault(scope, []).append(encoded)
        out = []
        for resource, scopes in groups.values():
            body = [self.resource(resource)]
            for scope, encoded_spans in scopes.items():
                scope_body = [self.scope(scope), *encoded_spans]
                if scope is not None and scope.schema_url:
                    scope_body.append(_text(b"\x1a", scope.schema_url))
                body.append(_field(b"\x12", b"".join(scope_body)))
            if resource.schema_url:
                body.append(_text(b"\x1a", resource.schema_url))
            out.append(_field(b"\x0a", b"".join(body)))
        return b"".join(out)


def _flags(parent: SpanContext | None) -> int:
    """``Span.flags`` / ``Link.flags``: whether the parent (linked) context is known to be remote, and is."""
    return _HAS_IS_REMOTE | _IS_REMOTE if parent is not None and parent.is_remote else _HAS_IS_REMOTE

