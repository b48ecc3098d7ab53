"""Building blocks of the HTTP/2 connection in ``h2.py``: h2's state machine for a connection
the peer is closing gracefully, the stream slots, and the socket's view of the peer."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.stream
import hyperframe.frame

_IN = h2.connection.ConnectionInputs
# What may still happen on a connection the peer is closing gracefully: its frames for the
# streams it accepted, and our acknowledgements, resets and pings in return.
_DRAINING_INPUTS = frozenset({
    _IN.RECV_HEADERS, _IN.RECV_DATA, _IN.RECV_WINDOW_UPDATE, _IN.RECV_PING, _IN.RECV_SETTINGS,
    _IN.RECV_RST_STREAM, _IN.RECV_PRIORITY, _IN.RECV_ALTERNATIVE_SERVICE, _IN.RECV_PUSH_PROMISE,
    _IN.SEND_WINDOW_UPDATE, _IN.SEND_RST_STREAM, _IN.SEND_PING, _IN.SEND_SETTINGS,
})
# States of a stream that may still receive DATA, so that needs our WINDOW_UPDATEs.
_RECEIVING = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL})
_WINDOW_UPDATE = hyperframe.frame.WindowUpdateFrame.type
#: Bytes the peer may send ahead of what we have read, at most, per connection and per stream
#: (httpcore advertises 16 MiB). See :func:`receive_window`.
RECEIVE_WINDOW = 1 << 20
#: Headroom over the window for frame and TLS record overheads and the response headers (which
#: flow control does not count), with room to spare: 1.25 left proxied GOAWAY tests flaky under load.
_HEADROOM = 2.0
#: Share of a socket's receive buffer, as getsockopt(SO_RCVBUF) reports it, that can hold data:
#: the kernel doubles what it is asked for and keeps about half for its own accounting
#: (net.ipv4.tcp_adv_win_scale = 1).
_DATA_SHARE = 0.5
# tcp_info.tcpi_state values (linux/tcp_states.h) once the peer has sent its FIN or a reset.
_PEER_FINISHED_STATES = frozenset({7, 8, 9})  # CLOSE, CLOSE_WAIT, LAST_ACK


class DrainingStateMachine(h2.connection.H2ConnectionStateMachine):
    """h2's connection state machine, but a GOAWAY received from the peer does not stop
    the streams the peer still answers: it is CLOSED for new streams (so httpcore's
    ``is_available()`` says no), and open for the frames of :data:`_DRAINING_INPUTS`."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = False

    def process_input(self, input_: h2.connection.ConnectionInputs) -> list[Any]:
        if self.draining and input_ in _DRAINING_INPUTS:
            return []
        events = super().process_input(input_)
        if input_ is _IN.RECV_GOAWAY:
            self.draining = True
        return events


class DrainingH2Connection(h2.connection.H2Connection):
    """h2's connection with :class:`DrainingStateMachine`, and that keeps what it has not yet
    written when the peer's GOAWAY arrives.

    h2 throws its whole outbound buffer away on receiving GOAWAY ("we cannot send further data
    now"). But the peer still answers the streams it accepted, and for those it needs our
    WINDOW_UPDATEs (RFC 9113 §6.8): an update a stream had queued just before the reader took in
    the GOAWAY vanished, and nginx, its connection window spent, then sent nothing more; ~50
    responses of a 1,000-request connection waited for their read timeout (about one whole test
    suite run in five; the GOAWAY arrives while updates wait for the write lock).
    """

    def __init__(self, config: h2.config.H2Configuration | None = None) -> None:
        super().__init__(config=config)
        self.state_machine = self._machine = DrainingStateMachine()
        self._last_accepted = 0  # the peer's GOAWAY's last stream id, once it has sent one

    def _receive_goaway_frame(self, frame: Any) -> Any:
        unsent = bytes(self._data_to_send)  # a copy: h2 may empty the buffer in place or replace it
        result = super()._receive_goaway_frame(frame)  # empties it (checks.py pins this source)
        self._last_accepted = frame.last_stream_id
        self._data_to_send = bytearray(_frames(unsent, lambda kind, stream_id: stream_id <= frame.last_stream_id)) \
            + self._data_to_send
        return result

    def data_to_send(self, amount: int | None = None) -> bytes:
        """h2's, but once the peer has said GOAWAY and every stream it accepted has received its
        last frame, without WINDOW_UPDATEs: the peer sends nothing more that they could be for.

        Every byte written late to a closing connection is one more that a proxy may still hold
        unread when it closes the tunnel: tinyproxy and microsocks then reset it, which destroys
        the answers they had not passed on yet (and the request goes again)."""
        data = super().data_to_send(amount)
        if data and self._machine.draining and not self._answers_to_come():
            data = _frames(data, lambda kind, stream_id: kind != _WINDOW_UPDATE)
        return data

    def _answers_to_come(self) -> bool:
        """Whether a stream the peer's GOAWAY accepted may still receive DATA."""
        return any(stream_id <= self._last_accepted and stream.state_machine.state in _RECEIVING
                   for stream_id, stream in self.streams.items())


def _frames(data: bytes, keep: Callable[[int | None, int], bool]) -> bytes:
    """The frames of ``data`` (whole serialized frames) for which ``keep(frame type, stream id)``
    is true; ``data`` unchanged if it does not parse as whole frames.

    After a GOAWAY, the frames for streams above its last stream id are dropped: the server
    ignores them, and every byte written late to a closing connection is one more that a proxy may
    still hold unread when it closes the tunnel (its reset then destroys answers it had not passed
    on). No HEADERS can follow on this connection, so dropping some leaves no HPACK state to keep."""
    kept, at, view = bytearray(), 0, memoryview(data)
    while at + 9 <= len(data):  # a frame header is 9 bytes; its body is not parsed
        frame, length = hyperframe.frame.Frame.parse_frame_header(view[at:at + 9])
        end = at + 9 + length
        if keep(frame.type, frame.stream_id):
            kept += data[at:end]
        at = end
    return bytes(kept) if at == len(data) else data


class StreamSlots:
    """How many more streams may open on a connection; changed without awaiting, so a
    cancellation cannot leave it half updated. ``available`` may go negative when the
    peer lowers its limit below the streams already open."""

    __slots__ = ("_waiters", "available")

    def __init__(self, available: int) -> None:
        self.available = available
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        """Take a slot, waiting for one; on cancellation nothing is held."""
        if self.available > 0 and not self._waiters:
            self.available -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # handed a slot just as we gave up
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def shed(self, error: type[BaseException]) -> int:
        """Fail every waiter (with ``error()``): they get no slot here. Returns how many."""
        shed = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error())
                shed += 1
        return shed

    def release(self, count: int = 1) -> None:
        """Give back ``count`` slots (or add them, when the peer raises its limit)."""
        self.available += count
        while self.available > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.available -= 1
                waiter.set_result(None)


def stream_info(stream: Any, name: str) -> Any:
    """``stream.get_extra_info(name)`` of an httpcore network stream, or None when ``stream`` is
    None or its connection is gone.

    anyio's socket stream raises AttributeError there instead of returning None: it calls
    ``getpeername()`` on the socket of a uvloop transport already closed, which is None (seen
    when a proxy dies just as a tunnel's TLS handshake ends)."""
    if stream is None:
        return None
    try:
        return stream.get_extra_info(name)
    except AttributeError:
        return None


def peer_finished(sock: Any) -> bool:
    """Whether the peer of socket ``sock`` (a stream's ``get_extra_info("socket")``) has sent its
    FIN or reset the connection (Linux: ``TCP_INFO``; elsewhere, or None, False, so a write is
    attempted as before)."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] in _PEER_FINISHED_STATES
    except (OSError, ValueError):  # closed meanwhile (uvloop's socket says "negative file descriptor")
        return True


def reserve_receive_buffer(stream: Any) -> None:
    """Ask the kernel for a receive buffer that holds a whole :data:`RECEIVE_WINDOW` (capped by
    ``net.core.rmem_max``; :func:`receive_window` adapts to what was granted)."""
    sock = stream_info(stream, "socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(RECEIVE_WINDOW * _HEADROOM))


def receive_window(stream: Any) -> int:
    """The HTTP/2 receive window to advertise on ``stream``: :data:`RECEIVE_WINDOW`, or less when
    the socket's receive buffer could not hold that much.

    What the window lets the peer send must fit in the kernel even while we read slowly. Else a
    proxy relaying the connection holds the rest, and if it closes the tunnel (the server ended
    the connection) while our last writes sit unread in it, the reset that follows discards what
    it held: measured with squid, tinyproxy and microsocks under CPU load, a 16 MiB window lost
    3-30 % of the responses in flight at every GOAWAY. HTTP/2's default is the floor (64 KiB).
    """
    sock = stream_info(stream, "socket")
    try:
        buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) if sock is not None else 0
    except (OSError, ValueError):
        buffer = 0
    fits = int(buffer * _DATA_SHARE / _HEADROOM)
    return max(65_535, min(RECEIVE_WINDOW, fits)) if buffer else RECEIVE_WINDOW
