"""The gRPC side: a SERVER span per call and ``rpc.server.call.duration``, with current RPC names.

Why not ``opentelemetry-instrumentation-grpc``: its aio server interceptor emits the pre-v1.39
attributes (``rpc.grpc.status_code``, a short ``rpc.method``) and no metrics at all. This one
continues the caller's W3C trace context from the call metadata (a malformed ``traceparent``
starts a new trace), makes the SERVER span current while the handler runs, so every fetch of
the call gets a CLIENT span under it, and records the call duration in seconds.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import context as context_api
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from fetchpool.telemetry import names as n
from fetchpool.telemetry.metrics import Instruments

logger = logging.getLogger(__name__)

_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _metadata_carrier(metadata: Any) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str) and key not in carrier:
            carrier[key.lower()] = value
    return carrier


def _code_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    """The status the call ends with: what the handler set (or aborted with), else from ``exc``."""
    code: Any = None
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, int):
        code = _CODES_BY_VALUE.get(code)
    if isinstance(code, grpc.StatusCode) and (code is not grpc.StatusCode.OK or exc is None):
        return code
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        try:
            if context.time_remaining() is not None and context.time_remaining() <= 0:
                return grpc.StatusCode.DEADLINE_EXCEEDED
        except Exception:
            pass
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _Call:
    """One call being observed: its span (if traced), its start, its context token."""

    __slots__ = ("_instruments", "_method", "_span", "_start", "_token", "responses")

    def __init__(self, tracer: Tracer | None, instruments: Instruments | None, method: str,
                 context: grpc.aio.ServicerContext) -> None:
        self._instruments = instruments
        self._method = method
        self._start = time.monotonic()
        self._span: trace.Span | None = None
        self._token: object | None = None
        self.responses = 0
        if tracer is not None:
            parent = propagate.extract(_metadata_carrier(context.invocation_metadata()))
            service, _, _ = method.rpartition("/")
            self._span = tracer.start_span(method, context=parent, kind=SpanKind.SERVER, attributes={
                n.RPC_SYSTEM_NAME: "grpc",
                n.RPC_METHOD: method,
                n.RPC_SYSTEM_LEGACY: "grpc",
                n.RPC_SERVICE_LEGACY: service,
            })
            self._token = context_api.attach(trace.set_span_in_context(self._span, parent))

    def finish(self, context: grpc.aio.ServicerContext, exc: BaseException | None, streaming: bool) -> None:
        try:
            code = _code_of(context, exc)
            if self._span is not None:
                span = self._span
                span.set_attribute(n.RPC_RESPONSE_STATUS_CODE, code.name)
                span.set_attribute(n.RPC_GRPC_STATUS_CODE_LEGACY, code.value[0])
                if streaming:
                    span.set_attribute(n.RPC_RESPONSES, self.responses)
                if code is not grpc.StatusCode.OK:
                    span.set_attribute(n.ERROR_TYPE, code.name)
                if code.name in n.SERVER_ERROR_CODES:
                    span.set_status(Status(StatusCode.ERROR, code.name))
                span.end()
            if self._instruments is not None:
                # The SERVER span, when sampled, is the duration's exemplar.
                sampled = self._span.get_span_context() if self._span is not None else None
                if sampled is not None and not sampled.trace_flags.sampled:
                    sampled = None
                self._instruments.rpc_duration.record(time.monotonic() - self._start, ("grpc", self._method, code.name),
                                                      sampled, time.time_ns())
        except Exception:
            logger.debug("rpc telemetry failed", exc_info=True)
        finally:
            if self._token is not None:
                context_api.detach(self._token)  # type: ignore[arg-type]
                self._token = None


class ServerTelemetryInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span (if ``tracer``) and ``rpc.server.call.duration`` (if ``instruments``) per call.

    Health and reflection calls are passed through untouched.
    """

    def __init__(self, tracer: Tracer | None, instruments: Instruments | None) -> None:
        self._tracer = tracer
        self._instruments = instruments

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full = handler_call_details.method or ""
        if handler is None or not full.startswith("/") or full[1:].startswith(n.UNTRACED_SERVICES):
            return handler
        method = full[1:]  # "fetchpool.v1.FetchService/Fetch"
        tracer, instruments = self._tracer, self._instruments

        if handler.response_streaming:
            behavior: Any = handler.stream_stream if handler.request_streaming else handler.unary_stream

            async def streaming(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                call = _Call(tracer, instruments, method, context)
                failure: BaseException | None = None
                try:
                    result = behavior(request_or_iterator, context)
                    if inspect.isasyncgen(result):
                        async for response in result:
                            call.responses += 1
                            yield response
                    else:  # a coroutine writing with context.write()
                        await result
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    call.finish(context, failure, True)

            make = grpc.stream_stream_rpc_method_handler if handler.request_streaming \
                else grpc.unary_stream_rpc_method_handler
            return make(streaming, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)

        unary_behavior: Any = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def unary(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(tracer, instruments, method, context)
            failure: BaseException | None = None
            try:
                return await unary_behavior(request_or_iterator, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                call.finish(context, failure, False)

        make_unary = grpc.stream_unary_rpc_method_handler if handler.request_streaming \
            else grpc.unary_unary_rpc_method_handler
        return make_unary(unary, request_deserializer=handler.request_deserializer,
                          response_serializer=handler.response_serializer)
