"""httpcore's HTTP/2 connection, made to survive a graceful close and cancellation.

Measured against nginx (``keepalive_requests``, which ends a connection with GOAWAY) through
squid, tinyproxy and microsocks, httpcore 1.0.9 with h2 4.x lost 1-2 % of requests per
GOAWAY and fetched another 3 % twice; a storm of cancelled requests left connections with
a corrupted stream semaphore ("released too many times") that failed every later request.
The causes, each fixed here:

- h2 moves its connection state machine to CLOSED on receiving GOAWAY and then rejects every
  frame, even the DATA of streams the server accepted and is still answering (python-hyper/h2
  #1181); a whole read buffer of events is thrown away with it. It also drops what we had not
  yet written, the flow-control updates those streams need among it, so the server stalled.
  ``h2_support.DrainingH2Connection`` keeps receiving for those streams and keeps our updates
  going, as RFC 9113 §6.8 describes.
- httpcore fails every stream once it has seen GOAWAY (encode/httpcore PR #1054, unmerged).
  Here streams above the GOAWAY's last stream id go to another connection
  (``ConnectionNotAvailable``: never processed), the others are read to their end.
- A flow-control update written back after the peer has closed fails, and httpcore then
  fails every stream of the connection with that write error, although their bodies may be
  fully received; worse, asyncio closes the socket on a failed write, and what the peer sent
  before closing is lost unread. Here nothing is written once the peer has finished (its FIN
  or reset: nothing we send can matter any more), and writes made while receiving are best
  effort: the streams whose responses arrived are read to their end.
- The stream semaphore was set up with ~100 awaits, and its resizes awaited too: a
  cancellation in between left it with too many permits. :class:`StreamSlots` is changed
  without awaiting. The connection's state changes without awaiting too, so a request
  cancelled before its stream opened no longer leaves the connection ACTIVE for good.
- The receive window is sized to the socket's receive buffer (1 MiB at most, httpcore's is 16):
  see ``h2_support.receive_window``.
- httpcore keeps one stream per connection until the server's SETTINGS name a limit, and for ever
  when they name none; here the limit is the server's (``MAX_STREAMS`` at most) from its first
  SETTINGS on, and :attr:`~GracefulHTTP2Connection.stream_capacity` tells the pool how many
  requests a connection can carry at once, so that it sends the next one elsewhere (``pool.py``).
  Requests it sent before the SETTINGS arrived and that the server's limit leaves without a
  stream go back to the pool for another connection (``ConnectionNotAvailable``) instead of
  waiting behind the others.
- A stream given up before its end (cancelled, or a body over the cap) is reset
  (RST_STREAM CANCEL) so the server stops sending, and DATA still arriving for it is
  acknowledged at the connection level so it cannot exhaust the connection's window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from httpcore import (
    ConnectionNotAvailable,
    LocalProtocolError,
    ReadTimeout,
    RemoteProtocolError,
    Request,
    Response,
    WriteError,
)
from httpcore._async.http2 import (
    AsyncHTTP2Connection,
    HTTP2ConnectionByteStream,
    HTTPConnectionState,
    has_body_headers,
)
from httpcore._trace import Trace

from fetchpool.engine._httpcore.h2_support import (
    DrainingH2Connection,
    StreamSlots,
    peer_finished,
    receive_window,
    stream_info,
)
from fetchpool.engine._httpcore.shield import shielded

logger = logging.getLogger("httpcore.http2")  # httpcore's: trace events keep their "http2." names
_CLOSED = h2.connection.ConnectionState.CLOSED
#: Times one request may be moved to another connection because a GOAWAY refused it.
MAX_REQUEUES = 3
_REQUEUES: weakref.WeakKeyDictionary[Request, int] = weakref.WeakKeyDictionary()
_FLOW = 0  # the waiters' key of requests waiting for send window (stream ids are odd)
#: Seconds a write made while receiving (an acknowledgement, a reset) may take: it has no
#: request timeout of its own, and a peer that stopped reading must not hold it for ever.
RECEIVE_SIDE_WRITE_TIMEOUT = 5.0
#: Streams open at most on one connection, whatever the server allows (httpcore's cap too; RFC
#: 9113 §6.5.2 recommends servers allow at least 100). Also advertised as our own limit.
MAX_STREAMS = 100


class GracefulHTTP2Connection(AsyncHTTP2Connection):
    """httpcore's ``AsyncHTTP2Connection`` with the fixes of this module's docstring.

    The methods overridden here replace httpcore 1.0.9's; ``checks.py`` verifies at start-up
    that the base class still has the source they were written against.
    """

    # httpcore turns h2's check of received header blocks off, and then reports a response
    # without ``:status`` as a 200. RFC 9113 §8.3.2 makes such a response (or one with
    # upper-case or connection-specific fields) malformed; Go's client rejects it too.
    CONFIG = h2.config.H2Configuration(validate_inbound_headers=True)

    def __init__(self, *args: Any, on_refusing_goaway: Callable[[int], None] | None = None, **kwargs: Any) -> None:
        """httpcore's arguments; ``on_refusing_goaway(n)`` is called when the server's graceful
        GOAWAY accepted ``n`` streams and refused later ones we had opened (``limits.py``)."""
        super().__init__(*args, **kwargs)
        self._on_refusing_goaway = on_refusing_goaway
        self._h2_state = DrainingH2Connection(config=self.CONFIG)
        self._slots = StreamSlots(0)
        self._settings_seen = False  # the server's first SETTINGS arrived (its stream limit is known)
        # Looked up once: get_extra_info builds anyio's whole attribute table per call, and every
        # write asks for the socket (peer_finished).
        self._socket = stream_info(self._network_stream, "socket")
        self._sending: set[int] = set()  # id() of the requests being written (a failed write fails them)
        self._reader: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        # Streams waiting for an event (and _FLOW: requests waiting for send window).
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}

    async def handle_async_request(self, request: Request) -> Response:
        if not self.can_handle_request(request.url.origin):
            raise RuntimeError(f"Attempted to send request to {request.url.origin} on connection to {self._origin}")
        if self._state not in (HTTPConnectionState.ACTIVE, HTTPConnectionState.IDLE):
            raise ConnectionNotAvailable()
        self._request_count += 1
        self._expire_at = None
        self._state = HTTPConnectionState.ACTIVE
        self._sending.add(id(request))
        try:
            await self._open_stream_slot(request)
            if not self.is_available():  # the peer said GOAWAY, or the connection failed, meanwhile
                self._slots.release()
                raise ConnectionNotAvailable()
            stream_id = self._h2_state.get_next_available_stream_id()
            # The streams it waited behind may all have ended meanwhile, leaving the connection
            # IDLE: it is busy again, or the pool's upkeep would close it under this stream.
            self._state = HTTPConnectionState.ACTIVE
            self._expire_at = None
        except h2.exceptions.NoAvailableStreamIDError:
            self._sending.discard(id(request))
            self._used_all_stream_ids = True
            self._slots.release()
            self._unstarted()
            raise ConnectionNotAvailable() from None
        except BaseException:
            self._sending.discard(id(request))
            self._unstarted()
            raise
        self._events[stream_id] = []
        kwargs = {"request": request, "stream_id": stream_id}
        try:
            try:
                async with Trace("send_request_headers", logger, request, kwargs):
                    await self._send_request_headers(request=request, stream_id=stream_id)
                async with Trace("send_request_body", logger, request, kwargs):
                    await self._send_request_body(request=request, stream_id=stream_id)
            finally:
                self._sending.discard(id(request))
            async with Trace("receive_response_headers", logger, request, kwargs) as trace:
                status, headers = await self._receive_response(request=request, stream_id=stream_id)
                trace.return_value = (status, headers)
        except BaseException as exc:
            await shielded(self._close_stream(request, stream_id))
            if self._refused(stream_id):
                self._requeue_or_fail(request)
            terminated = self._connection_terminated
            if isinstance(exc, h2.exceptions.ProtocolError):
                raise (RemoteProtocolError(terminated) if terminated else LocalProtocolError(exc)) from exc
            raise
        return Response(
            status=status,
            headers=headers,
            content=HTTP2ConnectionByteStream(self, request, stream_id=stream_id),
            extensions={"http_version": b"HTTP/2", "network_stream": self._network_stream, "stream_id": stream_id},
        )

    async def _send_connection_init(self, request: Request) -> None:
        # httpcore's settings, but a receive window the socket's buffer can hold (h2_support's
        # receive_window), for the connection and, through SETTINGS_INITIAL_WINDOW_SIZE, for every
        # stream (so no WINDOW_UPDATE per request either). A server that runs far ahead also buries
        # its GOAWAY behind data we have not read, so we keep opening streams it will refuse.
        window = receive_window(self._network_stream)
        self._h2_state.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
        })
        # Some servers balk at a setting they do not know in the first SETTINGS (httpcore's note).
        del self._h2_state.local_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL]
        self._h2_state.initiate_connection()
        if window > 65_535:
            self._h2_state.increment_flow_control_window(window - 65_535)
        await self._write_outgoing_data(request)

    async def _send_request_headers(self, request: Request, stream_id: int) -> None:
        # HTTP/1.1-style headers mapped to HTTP/2 (Host becomes :authority), as httpcore does.
        authority = next(v for k, v in request.headers if k.lower() == b"host")
        headers = [(b":method", request.method), (b":authority", authority), (b":scheme", request.url.scheme),
                   (b":path", request.url.target)]
        headers += [(k.lower(), v) for k, v in request.headers if k.lower() not in (b"host", b"transfer-encoding")]
        self._h2_state.send_headers(stream_id, headers, end_stream=not has_body_headers(request))
        await self._write_outgoing_data(request)

    async def _open_stream_slot(self, request: Request) -> None:
        async with self._init_lock:
            if self._state is HTTPConnectionState.CLOSED:  # closed while this request waited
                raise ConnectionNotAvailable()
            if not self._sent_connection_init:
                try:
                    async with Trace("send_connection_init", logger, request, {"request": request}):
                        await self._send_connection_init(request=request)
                except BaseException:
                    await shielded(self.aclose())
                    raise
                self._sent_connection_init = True
                # One stream until the peer's SETTINGS say how many (httpcore's rule).
                self._max_streams = 1
                self._slots.release(1)
                self._start_reader()
        if self._settings_seen and self._slots.available <= 0:
            # The pool sent it before the server's SETTINGS said how many streams there are:
            # another connection takes it (see _settings_changed).
            raise ConnectionNotAvailable()
        await self._slots.acquire()

    def _unstarted(self) -> None:
        """A request left before its stream opened: undo its claim on the connection."""
        self._request_count -= 1
        if self._state is HTTPConnectionState.ACTIVE and not self._events:
            self._become_idle()

    def _become_idle(self) -> None:
        self._state = HTTPConnectionState.IDLE
        if self._keepalive_expiry is not None:
            self._expire_at = time.monotonic() + self._keepalive_expiry

    async def _close_stream(self, request: Request, stream_id: int) -> None:
        async with Trace("response_closed", logger, request, {"stream_id": stream_id}):
            await self._response_closed(stream_id=stream_id)

    # Receiving. One reader task per connection reads the socket as data comes, hands each
    # stream its events and wakes it (Go's transport and hyper read this way). httpcore reads
    # only while a stream awaits its next event: the kernel's receive window then fills under
    # load, and a proxy that closes its tunnel while our last writes sit unread in it resets the
    # connection, discarding the responses still queued on its side (seen with squid,
    # tinyproxy and microsocks at every GOAWAY). The reader also keeps stream waits apart
    # from the socket: a cancelled stream can no longer abandon a read half-way.

    def _start_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop(), name="fetchpool-h2-reader")

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._network_stream.read(self.READ_NUM_BYTES)
                if not data:
                    raise RemoteProtocolError("Server disconnected")
                for event in self._h2_state.receive_data(data):
                    self._dispatch(event)
                if self._h2_state._data_to_send:  # acknowledgements (SETTINGS, PING): written aside
                    self._flush_soon()
        except Exception as exc:
            if isinstance(exc, h2.exceptions.ProtocolError):
                exc = RemoteProtocolError(self._connection_terminated or exc)
            self._read_exception = exc
            self._connection_error = True
            self._wake(self._waiters.keys())
            if not self._events:
                self._reader = None  # this task ends here: nothing to cancel
                await self.aclose()

    def _flush_soon(self) -> None:
        """Write what h2 has queued from a task of its own: the reader must never wait for the
        write lock, which requests sending their headers may hold one after another, or the
        socket's receive window fills while nobody reads."""
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._h2_state._data_to_send and self._state is not HTTPConnectionState.CLOSED:
            await self._write_outgoing_data(None)  # what the reader queued meanwhile goes too

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived | h2.events.DataReceived | h2.events.StreamEnded
                      | h2.events.StreamReset):
            queue = self._events.get(event.stream_id)  # type: ignore[arg-type]
            if queue is not None:
                queue.append(event)
                self._wake((event.stream_id,))  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                # A stream we gave up: hand its bytes back to the connection's window.
                self._h2_state.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            self._wake((_FLOW,))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings_changed(event)
            self._wake((_FLOW,))
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._connection_terminated = event
            self._wake(self._waiters.keys())
            last = event.last_stream_id or 0
            if (self._on_refusing_goaway is not None and event.error_code == h2.errors.ErrorCodes.NO_ERROR
                    and self._h2_state.highest_outbound_stream_id > last):
                self._on_refusing_goaway((last + 1) // 2)  # client streams are odd: 1, 3, 5, ...

    def _wake(self, keys: Iterable[int]) -> None:
        for key in list(keys):
            for waiter in self._waiters.pop(key, ()):
                if not waiter.done():
                    waiter.set_result(None)

    async def _receive_events(self, request: Request, stream_id: int | None = None) -> None:
        """Wait until stream ``stream_id`` has an event (None: until the send window may have
        grown); raises what ended the connection, or ``ConnectionNotAvailable`` for a stream
        the peer's GOAWAY says it will never answer (RFC 9113 §6.8). Each wait is bounded by
        the request's read timeout."""
        if stream_id is not None and self._refused(stream_id):
            raise ConnectionNotAvailable()
        if stream_id is not None and self._events.get(stream_id):
            return
        if self._read_exception is not None:
            raise self._read_exception
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(_FLOW if stream_id is None else stream_id, []).append(waiter)
        timeout = request.extensions.get("timeout", {}).get("read")
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            raise ReadTimeout(f"no data for {timeout:g} s") from None
        finally:
            if not waiter.done():
                waiter.cancel()

    def _refused(self, stream_id: int) -> bool:
        """Whether the peer's GOAWAY says it never processed ``stream_id`` (RFC 9113 §6.8)."""
        terminated = self._connection_terminated
        return terminated is not None and stream_id > (terminated.last_stream_id or 0)

    def _requeue_or_fail(self, request: Request) -> NoReturn:
        """A request the peer never processed: after a graceful GOAWAY it goes to another connection
        (``ConnectionNotAvailable``: httpcore's pool finds one), at most MAX_REQUEUES times; a GOAWAY
        with an error code fails it (PROTOCOL), since a fresh connection is likely to end the same way."""
        terminated = self._connection_terminated
        assert terminated is not None
        requeues = _REQUEUES.get(request, 0)
        if terminated.error_code == h2.errors.ErrorCodes.NO_ERROR and requeues < MAX_REQUEUES:
            _REQUEUES[request] = requeues + 1
            raise ConnectionNotAvailable()
        raise RemoteProtocolError(terminated)

    @property
    def stream_capacity(self) -> int | None:
        """Requests this connection carries at once: the server's SETTINGS_MAX_CONCURRENT_STREAMS
        (at most ``MAX_STREAMS``); None until its first SETTINGS arrive."""
        return self._max_streams if self._settings_seen else None

    def _settings_changed(self, event: h2.events.RemoteSettingsChanged) -> None:
        # Every SETTINGS frame gives one event; a limit the server never names is unlimited.
        if not self._settings_seen or h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS in event.changed_settings:
            self._settings_seen = True
            wanted = min(self._h2_state.remote_settings.max_concurrent_streams, MAX_STREAMS)
            if wanted != self._max_streams:
                self._slots.release(wanted - self._max_streams)
                self._max_streams = wanted
            # Requests the pool sent before it knew the limit, for which no stream is free now,
            # go back to it for another connection (it sends no more than the limit from now on).
            self._slots.shed(ConnectionNotAvailable)

    async def _response_closed(self, stream_id: int) -> None:
        self._slots.release()
        for event in self._events.pop(stream_id, ()):  # received but never read: give the window back
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                self._h2_state.acknowledge_received_data(event.flow_controlled_length, stream_id)
        self._waiters.pop(stream_id, None)
        stream = self._h2_state.streams.get(stream_id)
        # Given up before its end: tell the server to stop sending it. Not once the peer has said
        # GOAWAY: it ignores the streams above its last one, finishes the others and closes, and
        # a proxy between us may reset the connection over writes it has not read by then.
        if stream is not None and not stream.closed and self._h2_state.state_machine.state != _CLOSED:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2_state.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        if (self._connection_terminated is not None or self._read_exception is not None) and not self._events:
            await self.aclose()
            return
        if self._state is HTTPConnectionState.ACTIVE and not self._events:
            self._become_idle()
            if self._used_all_stream_ids:
                await self.aclose()
                return
        await self._write_outgoing_data(None)

    async def aclose(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        await super().aclose()

    async def _write_outgoing_data(self, request: Request | None) -> None:  # type: ignore[override]
        """Write what h2 has queued.

        A write for a request being sent fails that request. Writes made while receiving
        (acknowledgements, resets; ``request`` None or already sent) are best effort: the
        streams whose responses already arrived can still be read to their end, and the
        reads tell the others that the connection is gone.
        """
        if not self._h2_state._data_to_send:
            return
        sending = request is not None and id(request) in self._sending
        if peer_finished(self._socket):
            # Writing now would fail, and the failed write would close the socket under the
            # streams whose responses are still unread in its receive buffer.
            self._h2_state.data_to_send()  # the peer reads nothing more
            self._connection_error = True
            if sending:
                raise WriteError("the peer has closed the connection")
            return
        timeout = RECEIVE_SIDE_WRITE_TIMEOUT
        if sending and request is not None:
            timeout = request.extensions.get("timeout", {}).get("write")
        async with self._write_lock:
            data = self._h2_state.data_to_send()
            if not data:  # only updates no stream needs any more (DrainingH2Connection)
                return
            try:
                if self._write_exception is not None:
                    raise self._write_exception
                await self._network_stream.write(data, timeout)
            except Exception as exc:
                self._write_exception = exc
                self._connection_error = True
                if sending:
                    raise
                # Our flow-control updates can no longer reach the peer: a stream that still needs
                # data would wait for its read timeout. What already arrived is still read; a
                # stream that must wait for more fails now, with this error.
                if self._read_exception is None:
                    self._read_exception = exc
                    self._wake(self._waiters.keys())
