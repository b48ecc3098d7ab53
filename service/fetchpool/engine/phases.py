"""Per-request phase recording from httpcore's ``trace`` request extension.

httpcore calls the extension with events named ``<module>.<step>.started``,
``.complete`` or ``.failed`` (``connection.connect_tcp``, ``http_proxy.start_tls``,
``http11.send_request_headers``, ``http2.receive_response_headers``, ...;
see httpcore's docs, "Extensions: trace"). :class:`PhaseRecorder` turns them into
timed phases, the reuse flag and the pool's counters, with no patching.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fetchpool.engine._httpcore import stream_info
from fetchpool.engine.model import Timings


@dataclass(slots=True)
class Phase:
    """One timed step: monotonic ``start``/``end`` seconds and attributes."""

    name: str
    start: float
    end: float = 0.0
    attributes: dict[str, Any] = field(default_factory=dict)
    failed: bool = False


class PoolCounters:
    """Counters a pool keeps, updated from trace events (read by the pool's stats)."""

    __slots__ = ("connections_created", "http2_streams")

    def __init__(self) -> None:
        self.connections_created = 0
        self.http2_streams = 0


#: The reason a send repeated inside the transport is given when it was a GOAWAY's refusal.
REFUSED = "GOAWAY: the server refused the request without processing it"

# httpcore step -> our phase name. A proxy's CONNECT is an HTTP/1.1 request
# with method CONNECT; its send and response steps become one "proxy.connect", as
# does a SOCKS5 proxy's handshake.
_STEPS = {
    "connect_tcp": "connect",
    "setup_socks5_connection": "proxy.connect",
    "start_tls": "tls",
    "send_request_headers": "request.send",
    "receive_response_headers": "response.headers",
}


class PhaseRecorder:
    """Records the phases of one fetch (all its attempts); pass ``trace`` as the request's trace extension.

    ``acquire_started`` marks when the request began waiting for the pool; the
    pool wait ends when a connection starts being made or the request starts
    being sent on a pooled one.
    """

    __slots__ = (
        "_counters",
        "_open",
        "_pool_wait_open",
        "_stream_open",
        "connected",
        "failed_step",
        "phases",
        "resent",
        "responded",
        "sends",
    )

    def __init__(self) -> None:
        self._counters = PoolCounters()
        self.phases: list[Phase] = []
        self._open: dict[str, Phase] = {}
        self._pool_wait_open: Phase | None = None
        self._stream_open = False
        self.connected = False  # this attempt opened a new connection
        self.responded = False  # this attempt received response headers
        self.sends = 0  # times this attempt's request was sent (more than once: a GOAWAY refused it)
        self.resent: list[str] = []  # why it was sent again, each time (a retry reason)
        self.failed_step = ""

    def acquire_started(self, pool_key: str, counters: PoolCounters) -> Phase:
        """The request starts waiting for a connection of pool ``pool_key`` (a new attempt or
        redirect hop), whose counters this attempt updates; returns that phase."""
        self._counters = counters
        self.connected = False
        self.responded = False
        self.sends = 0
        self.resent = []
        self.failed_step = ""
        phase = self._pool_wait_open = Phase("pool.acquire", time.monotonic(), attributes={"pool": pool_key})
        self.phases.append(phase)
        return phase

    def _end_pool_wait(self, now: float) -> None:
        if self._pool_wait_open is not None:
            self._pool_wait_open.end = now
            self._pool_wait_open = None

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        """The httpcore trace callback."""
        now = time.monotonic()
        module, _, rest = event.partition(".")
        step, _, state = rest.rpartition(".")
        if step == "response_closed":
            if module == "http2" and state != "started":
                self._close_stream()
            return
        name = _STEPS.get(step)
        if name is None:
            return
        tunnel = self._open.get("proxy.connect")
        if tunnel is not None:  # inside the proxy's CONNECT exchange or SOCKS5 handshake
            if state != "started" and step in ("receive_response_headers", "setup_socks5_connection"):
                self._end(tunnel, now, failed=state == "failed")
            return
        if state == "started":
            request = info.get("request")
            if step == "send_request_headers" and request is not None and request.method == b"CONNECT":
                name = "proxy.connect"
            if name in ("connect", "request.send", "proxy.connect"):
                self._end_pool_wait(now)
            if name == "request.send":
                self.sends += 1
                if self.sends > 1:  # httpcore sends again only what a GOAWAY refused
                    self.resent.append(REFUSED)
                if module == "http2":
                    self._stream_open = True
                    self._counters.http2_streams += 1
            phase = Phase(name, now)
            self._open[name] = phase
            self.phases.append(phase)
            return
        ended = self._open.get(name)
        if ended is None:
            return
        phase = ended
        self._end(phase, now, failed=state == "failed")
        if state == "failed":
            if name == "request.send":
                self._close_stream()
        elif name == "response.headers":
            self.responded = True
        elif name == "connect":
            self.connected = True
            self._counters.connections_created += 1
        elif name == "tls":
            stream = info.get("return_value")
            ssl_object = stream_info(stream, "ssl_object")
            if ssl_object is not None:
                phase.attributes["tls.alpn"] = ssl_object.selected_alpn_protocol() or ""
                phase.attributes["tls.protocol.version"] = ssl_object.version() or ""

    def timed(self, queued_until: float, phases: list[Phase], *, connected: bool, responded: bool,
              http2: bool, sends: int = 1, resent: Sequence[str] = ()) -> None:
        """Phases a transport timed itself (libcurl reports them per transfer, after the fact):
        the pool wait ends at ``queued_until`` (monotonic), ``phases`` (connect, proxy.connect,
        tls, request.send, response.headers) are added as they are; the request was sent
        ``sends`` times (again for the ``resent`` reasons; REFUSED for those not given), ``connected`` on a
        new connection, ``responded`` with headers, over ``http2`` (a stream counted until the attempt
        ends). A failed phase names the step it failed at."""
        self._end_pool_wait(queued_until)
        self.phases.extend(phases)
        self.sends += sends
        # (a resend held back and never sent has a reason but no send)
        self.resent += [*resent[:sends - 1], *[REFUSED] * (sends - 1 - len(resent))]
        for phase in phases:
            if phase.failed:
                self.failed_step = phase.name
        if connected and not self.connected:
            self.connected = True
            self._counters.connections_created += 1
        if responded:
            self.responded = True
            if http2 and not self._stream_open:
                self._stream_open = True
                self._counters.http2_streams += 1

    def _end(self, phase: Phase, now: float, *, failed: bool) -> None:
        del self._open[phase.name]
        phase.end = now
        if failed:
            phase.failed = True
            self.failed_step = phase.name

    def _close_stream(self) -> None:
        if self._stream_open:
            self._stream_open = False
            self._counters.http2_streams -= 1

    def finish_attempt(self) -> None:
        """Close phases left open by an attempt that ended (error or cancellation)."""
        now = time.monotonic()
        self._end_pool_wait(now)
        for phase in self._open.values():
            phase.end = now
            phase.failed = True
        self._open.clear()
        self._close_stream()

    def add(self, name: str, start: float, end: float, **attributes: Any) -> None:
        """Record a phase of our own (body read, retry back-off)."""
        self.phases.append(Phase(name, start, end, attributes))

    def timings(self, total: float) -> Timings:
        """Sum the phases into :class:`Timings` (seconds)."""
        t = Timings(total=total)
        for phase in self.phases:
            duration = max(0.0, phase.end - phase.start)
            if phase.name == "pool.acquire":
                t.pool_wait += duration
            elif phase.name == "connect":
                t.connect += duration
            elif phase.name == "proxy.connect":
                t.proxy_connect += duration
            elif phase.name == "tls":
                t.tls += duration
            elif phase.name == "response.headers" and not phase.failed:  # a first byte that came
                t.ttfb += duration
        return t
