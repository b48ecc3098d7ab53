"""The only module that reaches into the OTLP exporters' internals.

The OTLP/gRPC span exporter's transport (channel, TLS, headers, compression, timeout, retries
with back-off and ``RetryInfo``, reconnection, its own metrics) is kept as the library has it;
only the encoding is replaced by :class:`~fetchpool.telemetry._otlp_encoder.SpanEncoder`, about
three times cheaper on the export thread. What is private: the exporter mixin's
``_translate_data`` hook (called for every attempt) and its ``_stub``/``_client``/``_channel``
attributes (a stub whose ``Export`` takes the serialized request as bytes: gRPC sends bytes as
they are when a method has no request serializer). ``tests/unit/test_contract.py`` pins the
version this was checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan

from fetchpool.telemetry._otlp_encoder import SpanEncoder

CHECKED_VERSIONS = {"opentelemetry-exporter-otlp-proto-grpc": "1.45.2"}
_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class _SerializedTraceStub:
    """``TraceServiceStub`` whose ``Export`` takes an already serialized ``ExportTraceServiceRequest``."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.Export = channel.unary_unary(_EXPORT, request_serializer=None,
                                          response_deserializer=ExportTraceServiceResponse.FromString)


class GrpcSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/gRPC span exporter, configured the same way (arguments or ``OTEL_EXPORTER_OTLP_*``),
    with spans encoded by :class:`SpanEncoder`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._encoder = SpanEncoder()
        self._stub = _SerializedTraceStub  # also used when the exporter reconnects
        self._client = _SerializedTraceStub(self._channel)  # type: ignore[assignment,arg-type]

    def _translate_data(self, data: Sequence[ReadableSpan]) -> Any:
        return self._encoder.encode(data)
