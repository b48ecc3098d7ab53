"""Building blocks of the HTTP/2 connection in ``h2.py``: h2's state machine for a connection
the peer is closing gracefully, the stream slots, and the socket's view of the peer."""

from __future__ import annotations

import asyncio
import collections
import socket
from typing import Any

import h2.connection

_IN = h2.connection.ConnectionInputs
# What may still happen on a connection the peer is closing gracefully: its frames for the
# streams it accepted, and our acknowledgements, resets and pings in return.
_DRAINING_INPUTS = frozenset({
    _IN.RECV_HEADERS, _IN.RECV_DATA, _IN.RECV_WINDOW_UPDATE, _IN.RECV_PING, _IN.RECV_SETTINGS,
    _IN.RECV_RST_STREAM, _IN.RECV_PRIORITY, _IN.RECV_ALTERNATIVE_SERVICE, _IN.RECV_PUSH_PROMISE,
    _IN.SEND_WINDOW_UPDATE, _IN.SEND_RST_STREAM, _IN.SEND_PING, _IN.SEND_SETTINGS,
})
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
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as we gave up
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self, count: int = 1) -> None:
        """Give back ``count`` slots (or add them, when the peer raises its limit)."""
        self.available += count
        while self.available > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.available -= 1
                waiter.set_result(None)


def peer_finished(stream: Any) -> bool:
    """Whether the peer of ``stream`` has sent its FIN or reset the connection (Linux:
    ``TCP_INFO``; elsewhere False, so a write is attempted as before)."""
    sock = stream.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] in _PEER_FINISHED_STATES
    except (OSError, ValueError):  # closed meanwhile (uvloop's socket says "negative file descriptor")
        return True
