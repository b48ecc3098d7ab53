"""The engine's :class:`~fetchpool.engine.FetchObserver`: one CLIENT span per fetch, its phases as
child spans, and the per-fetch metrics.

Everything is built after the fact in :meth:`FetchTelemetry.fetch_finished` from the
:class:`~fetchpool.engine.phases.PhaseRecorder`'s phases, with explicit start and end
times, so nothing of ours runs per httpcore trace event. A batch of N URLs makes N
CLIENT spans (plus their phases) under the call's SERVER span, never one giant span.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from opentelemetry import context as context_api
from opentelemetry.trace import SpanKind, Status, StatusCode

from fetchpool.engine import FetchSpec, Outcome
from fetchpool.engine.phases import Phase, PhaseRecorder
from fetchpool.telemetry import names as n
from fetchpool.telemetry.metrics import Instruments
from fetchpool.telemetry.redact import redact_url, server_of
from fetchpool.telemetry.spans import UNSET, Event, FinishedSpans

logger = logging.getLogger(__name__)

#: Longest span status description (an error message) exported.
MAX_DESCRIPTION = 512
_CONNECTING = frozenset({"connect", "proxy.connect", "tls"})
_FAILED = Status(StatusCode.ERROR)
_ALPN_VERSIONS = {"h2": "2", "http/1.1": "1.1", "http/1.0": "1.0"}


class _Token:
    """What :meth:`FetchTelemetry.fetch_started` hands the engine: the caller's context, the
    start on both clocks, the method."""

    __slots__ = ("context", "method", "mono", "wall_ns")

    def __init__(self, context: context_api.Context | None, method: str) -> None:
        self.context = context
        self.method = method
        self.wall_ns = time.time_ns()
        self.mono = time.monotonic()


def _protocol_version(http_version: str) -> str:
    """``"HTTP/2"`` -> ``"2"``, ``"HTTP/1.1"`` -> ``"1.1"`` (``network.protocol.version``)."""
    return http_version[5:] if http_version.startswith("HTTP/") else http_version


def _tls_version(text: str) -> str:
    """``"TLSv1.3"`` (ssl) -> ``"1.3"`` (``tls.protocol.version``)."""
    return text[4:] if text.startswith("TLSv") else text


class FetchTelemetry:
    """Spans (when ``spans`` is given) and metrics (when ``instruments`` are) of every fetch.

    Never raises into the engine: a failure is logged once and the fetch goes on.
    """

    def __init__(self, spans: FinishedSpans | None, instruments: Instruments | None,
                 phases: str = n.PHASES_AS_EVENTS) -> None:
        if phases not in n.PHASE_MODES:
            raise ValueError(f"phases must be one of {', '.join(n.PHASE_MODES)}, got {phases!r}")
        self._spans = spans
        self._instruments = instruments
        self._phases = phases
        self._failed = False

    # --- FetchObserver -------------------------------------------------------------------------
    def fetch_started(self, spec: FetchSpec) -> object:
        return _Token(context_api.get_current() if self._spans is not None else None, spec.method or "GET")

    def fetch_finished(self, token: object, outcome: Outcome, recorder: PhaseRecorder | None) -> None:
        try:
            assert isinstance(token, _Token)
            end_ns = token.wall_ns + int((time.monotonic() - token.mono) * 1e9)
            method = token.method.upper()
            if self._spans is not None:
                self._span(token, method, end_ns, outcome, recorder)
            if self._instruments is not None:
                self._record(method, outcome, recorder)
        except Exception:
            if not self._failed:
                self._failed = True
                logger.exception("fetch telemetry failed (logged once; fetches are not affected)")

    def connection_closed(self, pool: str, lifetime: float, http_version: str = "") -> None:
        """Record the lifetime of a pooled connection that closed (``http.client.connection.duration``).

        The engine's per-second pool upkeep calls it for each connection found closed.
        """
        if self._instruments is not None:
            attributes: dict[str, Any] = {n.POOL_NAME: pool}
            if http_version:
                attributes[n.NETWORK_PROTOCOL_VERSION] = _protocol_version(http_version)
            self._instruments.connection_duration.record(max(0.0, lifetime), attributes)

    # --- spans ---------------------------------------------------------------------------------
    def _span(self, token: _Token, method: str, end_ns: int, outcome: Outcome,
              recorder: PhaseRecorder | None) -> None:
        spans = self._spans
        assert spans is not None
        known = method in n.KNOWN_METHODS
        attributes: dict[str, Any] = {
            n.HTTP_REQUEST_METHOD: method if known else "_OTHER",
            n.URL_FULL: redact_url(outcome.url),
        }
        if not known:
            attributes[n.HTTP_REQUEST_METHOD_ORIGINAL] = token.method
        host, port, _ = server_of(outcome.url)
        if host:
            attributes[n.SERVER_ADDRESS] = host
        if port is not None:
            attributes[n.SERVER_PORT] = port
        if outcome.pool:
            attributes[n.POOL_NAME] = outcome.pool
        if outcome.status_code:
            attributes[n.HTTP_RESPONSE_STATUS_CODE] = outcome.status_code
            attributes[n.CONNECTION_REUSED] = outcome.connection_reused
        if outcome.http_version:  # network.protocol.name is "http": left out, as the conventions allow
            attributes[n.NETWORK_PROTOCOL_VERSION] = _protocol_version(outcome.http_version)
        phases = recorder.phases if recorder is not None and self._phases != n.PHASES_OFF else ()
        if recorder is not None:  # one pool.acquire per request put on the wire: retries and redirect hops
            resends = sum(phase.name == "pool.acquire" for phase in recorder.phases) - 1
            if resends > 0:
                attributes[n.HTTP_REQUEST_RESEND_COUNT] = resends
        error = self._error_type(outcome)
        status = UNSET
        if error:
            attributes[n.ERROR_TYPE] = error
            status = Status(StatusCode.ERROR, (outcome.error_message or error)[:MAX_DESCRIPTION])
        as_spans = self._phases == n.PHASES_AS_SPANS
        events = []
        timed = []
        for phase in phases:
            start_ns = token.wall_ns + int((phase.start - token.mono) * 1e9)
            stop_ns = max(start_ns, token.wall_ns + int((phase.end - token.mono) * 1e9) if phase.end else end_ns)
            phase_attributes = self._phase_attributes(phase)
            name = n.PHASE_SPANS.get(phase.name, phase.name)
            if as_spans:
                timed.append((name, phase_attributes, start_ns, stop_ns, phase.failed))
            else:
                phase_attributes[n.PHASE_DURATION] = (stop_ns - start_ns) / 1e9
                if phase.failed:
                    phase_attributes[n.PHASE_FAILED] = True
                events.append(Event(name, phase_attributes, start_ns))
        name = method if known else n.SPAN_NAME_OTHER_METHOD
        context = spans.record(name, SpanKind.CLIENT, token.context, attributes, token.wall_ns, end_ns, status,
                               events)
        if context is not None:
            for name, phase_attributes, start_ns, stop_ns, failed in timed:
                spans.record_child(name, context, phase_attributes, start_ns, stop_ns, _FAILED if failed else UNSET)

    @staticmethod
    def _phase_attributes(phase: Phase) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        for key, value in phase.attributes.items():
            name = n.PHASE_ATTRIBUTES.get(key) or (key if "." in key else f"fetchpool.{key}")
            attributes[name] = _tls_version(value) if name == n.TLS_PROTOCOL_VERSION else value
        if n.TLS_PROTOCOL_VERSION in attributes:
            attributes[n.TLS_PROTOCOL_NAME] = "tls"
        return attributes

    @staticmethod
    def _error_type(outcome: Outcome) -> str:
        if outcome.error_kind is not None:
            return outcome.error_kind.name
        if outcome.status_code >= 400:
            return str(outcome.status_code)
        return ""

    # --- metrics -------------------------------------------------------------------------------
    def _record(self, method: str, outcome: Outcome, recorder: PhaseRecorder | None) -> None:
        instruments = self._instruments
        assert instruments is not None
        pool = {n.POOL_NAME: outcome.pool} if outcome.pool else {}
        attributes: dict[str, Any] = {n.HTTP_REQUEST_METHOD: method if method in n.KNOWN_METHODS else "_OTHER",
                                      **pool}
        scheme = outcome.url[:outcome.url.find(":")].lower() if ":" in outcome.url[:6] else ""
        if scheme in ("http", "https"):
            attributes[n.URL_SCHEME] = scheme
        if outcome.status_code:
            attributes[n.HTTP_RESPONSE_STATUS_CODE] = outcome.status_code
        if outcome.http_version:
            attributes[n.NETWORK_PROTOCOL_VERSION] = _protocol_version(outcome.http_version)
        error = self._error_type(outcome)
        if error:
            attributes[n.ERROR_TYPE] = error
        instruments.request_duration.record(outcome.timings.total, attributes)
        if recorder is None:
            return
        # Phases in order, one pool.acquire per attempt; a connection is created when an
        # attempt has connect (+ proxy.connect) (+ tls) phases that all succeeded.
        connecting: list[Phase] = []
        for phase in (*recorder.phases, None):
            if phase is None or phase.name == "pool.acquire":
                if connecting and not any(p.failed for p in connecting):
                    version = next((_ALPN_VERSIONS.get(p.attributes.get("tls.alpn", ""), "")
                                    for p in connecting if p.name == "tls"), "1.1")
                    created = {**pool, n.NETWORK_PROTOCOL_VERSION: version} if version else pool
                    instruments.create_time.record(
                        max(0.0, connecting[-1].end - connecting[0].start), created)
                connecting = []
                if phase is not None:
                    instruments.wait_time.record(max(0.0, phase.end - phase.start), pool)
            elif phase.name in _CONNECTING and (phase.name == "connect" or connecting):
                connecting.append(phase)
