"""A proxied connection whose proxy closed it, handed to libcurl on a socket pair.

Why (issue 15, measured): when a server ends its connection after a GOAWAY, the proxy closes
the tunnel (its FIN follows the last answer), and its kernel answers any later write of ours
with a reset. libcurl reads a connection a transfer at a time (16 KiB per turn) and writes
between those reads (a WINDOW_UPDATE at every response's headers, new streams), so it writes
after the proxy's FIN before it has read up to it; the write after the reset fails ("Send
failure: Broken pipe") and libcurl drops the connection with answers still unread in the
socket (and sends some answered requests again). No libcurl option turns those writes off.

So, once the proxy's FIN is there and before libcurl acts on the socket again
(:func:`ended_by_proxy`), :class:`Handover` reads everything the kernel holds for the socket and
puts one end of a socket pair under libcurl's descriptor (``dup2``, which closes the TCP socket:
the OS shows what the ledger counts). That end gives libcurl the same bytes and then the end of
the stream, and takes its writes without failing (they are dropped: nothing could deliver
them). libcurl then sees every answer, the GOAWAY and the close, as it does on a direct
connection, where the server's lingering close keeps its answers readable. When libcurl's write
met the proxy's close before it was seen, the socket is reset with the answers still readable
in it (a reset discards what the sender had not sent, not what the receiver holds): an HTTP/2
connection is handed over then too, and its failures are reported as the reset.

Measured with test_a_site_in_one_batch_survives_every_goaway, curl through squid, tinyproxy and
SOCKS5 with the tolerance off: with the receive buffer and reading first (driver.py) alone, 15
pages failed and 154 were sent twice in 4 rounds of the 6 cases (89 and 323 with neither); with
the hand-over too, none failed and 60 were sent twice in 8 rounds, all through squid, tinyproxy
and SOCKS5 clean. A capture of such a squid run: squid reset a tunnel without a FIN (a write of
ours reached it after the server's close, before its own), and 822 KB of answers it had
received never reached us: lost before our socket, where nothing of ours can save them.

Cost: until a proxy ends a connection, one ``poll`` of the tracked sockets before each call
into libcurl and at each response's headers (bench ``proxy/2KB``: no change in CPU per fetch).

Linux only (``POLLRDHUP``, ``TCP_INFO``); elsewhere nothing is handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
import termios
from collections.abc import Callable
from typing import Protocol

#: SO_RCVBUF asked for a proxied connection's socket (the kernel caps it at net.core.rmem_max).
#: libcurl lets a server send up to 10 MiB per stream and 1 GiB per connection ahead of what it
#: has read (no option lowers that), so when libcurl reads slowly the rest of the answers wait in
#: the proxy; when the server ends the connection after a GOAWAY and a write of ours reaches the
#: proxy after that, the proxy resets the tunnel and what it still held is lost. A buffer that
#: takes those answers in keeps them readable (a reset does not discard what the kernel received).
#: Measured with test_a_site_in_one_batch_survives_every_goaway, curl through squid, tinyproxy and
#: SOCKS5 with the tolerance off, 4 rounds of the 6 cases: 89 pages failed and 323 were sent twice
#: without this and reading first (driver.py); 52 / 240 with this alone, 28 / 194 with reading first
#: alone, 21 / 108 with both. A packet capture of a squid case: 3 MB of answers squid received
#: but never forwarded in 4 tunnels of 30 without it, none with it.
PROXIED_RECEIVE_BUFFER = 4 << 20
_FINISHED = (select.POLLRDHUP | select.POLLHUP | select.POLLERR) if hasattr(select, "POLLRDHUP") else 0
_CLOSE, _CLOSE_WAIT = 7, 8  # tcp_info.tcpi_state (linux/tcp_states.h)
#: Send buffer asked for the pair's end that feeds libcurl (the kernel caps it): most tails fit
#: at once; a longer one is written as libcurl reads.
_PAIR_BUFFER = 4 << 20


def ended_by_proxy(fd: int, multiplexed: Callable[[int], bool]) -> str | None:
    """How the proxy ended TCP socket ``fd``, if it is to be handed over: ``"fin"`` (state
    CLOSE_WAIT), or ``"reset"`` with bytes still unread on an HTTP/2 connection
    (``multiplexed(fd)``), where libcurl fails the streams a close cuts as it fails those a reset
    cuts, and the error is reported as the reset it was (:meth:`Tunnels.tunnel_reset`). A reset
    that followed the proxy's FIN (a write of ours met its close) is a ``"fin"``. None: neither
    (open, a failed connect, or a reset of an HTTP/1.1 connection, where a body that ends at the
    close would pass cut short)."""
    sock = socket.socket(fileno=fd)
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        if state == _CLOSE_WAIT:
            return "fin"
        if state != _CLOSE or not multiplexed(fd) or not _unread(fd):
            return None
        # Read only now: it clears the error. The kernel says EPIPE for a reset after a FIN.
        return "fin" if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.EPIPE else "reset"
    except OSError:
        return None
    finally:
        sock.detach()


def reset_local(fd: int) -> tuple[str, int] | None:
    """The local address of TCP socket ``fd``, still open here, if its connection was reset
    (state CLOSE), else None. A connection the server closed first and we then is in LAST_ACK
    or CLOSE; one we shut down first and the server then closed is in CLOSE too: the caller
    tells those apart (``RequestLimit.mark_reset``)."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=fd)
        try:
            if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _CLOSE:
                return tuple(sock.getsockname()[:2])  # type: ignore[return-value]
        finally:
            sock.detach()
    return None


def _unread(fd: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


class Tunnels(Protocol):
    """What the transport tells about its proxied connections (the curl engine)."""

    def tunnel_multiplexed(self, fd: int) -> bool:
        """Whether socket ``fd``'s connection is known to speak HTTP/2."""

    def tunnel_reset(self, local: tuple[str, int]) -> None:
        """The proxy reset the connection whose local address is ``local``, and it was handed
        over: its transfers' failures are the reset's."""


class TunnelEnds:
    """The proxied sockets a driver watches: which have input, which a proxy closed.

    ``swap(fd, make)``: the driver's way to change the file under ``fd`` (it stops watching
    ``fd``, calls ``make()``, and watches ``fd`` again as before)."""

    __slots__ = ("_closing", "_handed", "_loop", "_readable", "_swap", "_tunnels")

    def __init__(self, loop: asyncio.AbstractEventLoop, swap: Callable[[int, Callable[[], None]], None],
                 tunnels: Tunnels) -> None:
        self._loop = loop
        self._swap = swap
        self._tunnels = tunnels
        self._readable = select.poll()
        self._closing = select.poll()
        self._handed: dict[int, Handover] = {}  # fd -> the socket pair now under it

    def track(self, fd: int) -> None:
        """libcurl watches ``fd`` now."""
        handover = self._handed.get(fd)
        if handover is not None and handover.holds(fd):
            return  # ended already: nothing to hand over, nothing to read first
        self._readable.register(fd, select.POLLIN)
        if _FINISHED:
            self._closing.register(fd, _FINISHED)

    def untrack(self, fd: int) -> None:
        """libcurl no longer watches ``fd``."""
        for poller in (self._readable, self._closing):
            with contextlib.suppress(KeyError):
                poller.unregister(fd)

    def readable(self) -> list[int]:
        """The tracked sockets with input waiting."""
        return [fd for fd, _ in self._readable.poll(0)]

    def hand_over_closed(self) -> None:
        """Hand over every tracked socket whose proxy has closed it (:class:`Handover`). Run
        before each call into libcurl: one call may write on any of its connections."""
        for fd, _ in self._closing.poll(0) if _FINISHED else ():  # the common case: none
            ended = ended_by_proxy(fd, self._tunnels.tunnel_multiplexed)
            if ended == "reset":
                with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
                    self._tunnels.tunnel_reset(sock.getsockname()[:2])
            if ended is not None:
                self._swap(fd, lambda fd=fd: self._hand_over(fd))  # type: ignore[misc]

    def close(self) -> None:
        """The multi handle was closed: close the pairs' ends still open."""
        for handover in list(self._handed.values()):
            handover.close()

    def _hand_over(self, fd: int) -> None:
        self.untrack(fd)
        self._handed[fd] = Handover(self._loop, fd, self._closed)

    def _closed(self, handover: Handover) -> None:
        if self._handed.get(handover.fd) is handover:
            del self._handed[handover.fd]


class Handover:
    """Puts a socket pair's end under libcurl's descriptor ``fd`` (see the module docstring).
    The caller stops watching ``fd`` on ``loop`` first (its file changes) and watches it again
    after. ``on_closed(self)`` runs once libcurl closed its end and the pair is closed."""

    __slots__ = ("_loop", "_on_closed", "_ours", "_pending", "fd", "inode")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, on_closed: Callable[[Handover], None]) -> None:
        received = _read_all(fd)
        ours, theirs = socket.socketpair()
        with contextlib.suppress(OSError):
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _PAIR_BUFFER)
        ours.setblocking(False)
        theirs.setblocking(False)  # libcurl's sockets are non-blocking (a file's flag: dup2 keeps it)
        os.dup2(theirs.fileno(), fd, inheritable=False)
        theirs.close()
        self._loop = loop
        self._on_closed = on_closed
        self._ours = ours
        self._pending = memoryview(received)
        self.fd = fd
        self.inode = os.fstat(fd).st_ino  # tells this pair's end from a later socket on the same number
        loop.add_reader(ours.fileno(), self._drop_written)
        self._feed()

    def holds(self, fd: int) -> bool:
        """Whether descriptor ``fd`` is still this pair's end."""
        try:
            return os.fstat(fd).st_ino == self.inode
        except OSError:
            return False

    def close(self) -> None:
        """Close the pair's end we hold (libcurl's end reads the end of the stream)."""
        if self._ours.fileno() < 0:
            return
        self._loop.remove_reader(self._ours.fileno())
        self._loop.remove_writer(self._ours.fileno())
        self._ours.close()
        self._on_closed(self)

    def _feed(self) -> None:
        """Write what is left of the received bytes, then the end of the stream."""
        try:
            while self._pending:
                sent = self._ours.send(self._pending)
                self._pending = self._pending[sent:]
        except BlockingIOError:
            self._loop.add_writer(self._ours.fileno(), self._feed)
            return
        except OSError:  # libcurl closed its end
            self.close()
            return
        self._loop.remove_writer(self._ours.fileno())
        with contextlib.suppress(OSError):
            self._ours.shutdown(socket.SHUT_WR)

    def _drop_written(self) -> None:
        """Read and drop what libcurl wrote; its end closed: close ours."""
        try:
            while self._ours.recv(1 << 16):
                pass
        except BlockingIOError:
            return
        except OSError:
            pass
        self.close()


def _read_all(fd: int) -> bytes:
    """Everything the kernel holds for TCP socket ``fd``, up to the FIN or the reset."""
    sock = socket.socket(fileno=fd)
    try:
        chunks = []
        with contextlib.suppress(OSError):  # the reset after the data, or nothing more (EAGAIN)
            while chunk := sock.recv(1 << 18, socket.MSG_DONTWAIT):
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        sock.detach()
