"""One request on libcurl: the state its callbacks fill, and the body stream httpx reads.

libcurl calls :meth:`Exchange.on_header` and :meth:`Exchange.on_body` from inside
``socket_action`` (on the event loop's thread, with the GIL): they only append and wake, and
never raise (pycurl would print the exception and fail the transfer with a write error).
Everything else runs in the event loop between two libcurl calls, where ``getinfo`` is allowed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pycurl

from fetchpool.engine.phases import PhaseRecorder
from fetchpool.engine.transports.curl import tls
from fetchpool.errors import ErrorKind, FetchFailed

#: Body bytes buffered per response before libcurl is paused (back-pressure on a slow reader).
BUFFER_BYTES = 256 * 1024


class Exchange:
    """State of one request (see the module docstring). ``release`` tells its engine the request
    is no longer in flight, once libcurl is done with it (completed or removed)."""

    __slots__ = (
        "addresses", "before_write", "buffered", "busy", "chunks", "done", "easy", "error", "fd", "fresh",
        "header_bytes", "headers", "headers_ready", "held", "held_on", "lines", "max_header_bytes", "on", "opened",
        "paused", "ready", "recorder", "refused", "release", "reported", "request", "resent", "reset", "sends",
        "status", "t0", "t_tunnel", "tls_handle", "tls_version", "tunnel", "version", "waiter",
    )

    def __init__(self, easy: pycurl.Curl, request: httpx.Request, loop: asyncio.AbstractEventLoop, *,
                 tunnel: bool, addresses: frozenset[str] | None, max_header_bytes: int,
                 release: Callable[[Exchange], None],
                 before_write: Callable[[Exchange], None] | None = None, tls_handle: int = 0) -> None:
        self.easy = easy
        self.request = request
        self.recorder: PhaseRecorder | None = None
        self.tunnel = tunnel  # through an HTTP proxy to an https target: CONNECT on a new connection
        self.addresses = addresses  # the guard's approved addresses (None: no guard)
        self.max_header_bytes = max_header_bytes
        self.release = release
        # Run at a response's headers, inside libcurl, which writes next: it grows the stream's
        # receive window (a WINDOW_UPDATE). Proxied pools: CurlEngine._before_write.
        self.before_write = before_write
        self.tls_handle = tls_handle  # the easy handle's CURL * for tls.version (0: no TLS to read)
        self.tls_version = ""  # of the target's connection, read at the final header block
        self.status = 0
        self.version = b"HTTP/1.1"
        self.headers: list[tuple[bytes, bytes]] = []  # the final block's fields, once it ended
        self.lines: list[bytes] = []  # the lines of the block being received, its status line first
        self.header_bytes = 0
        self.ready = False  # the final header block ended (headers_ready is set)
        self.opened = 0  # sockets this request opened (0: it rode a pooled connection)
        self.fd = -1  # the socket it uses, once known
        self.t0 = time.monotonic()
        self.t_tunnel = 0.0
        self.headers_ready: asyncio.Future[None] = loop.create_future()
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.done = False
        self.held = True  # the request's coroutine has yet to read the transfer's facts (CurlEngine._let_go)
        self.reported = False
        self.error: BaseException | None = None
        self.refused = ""  # an address the guard refused
        # The request limit per connection (retire.py): the connection it is on, or the one
        # that held it back (their local addresses).
        self.on: tuple[str, int] | None = None
        self.held_on: tuple[str, int] | None = None
        self.busy = False  # sent while other requests were in flight on its connection
        # Why its connection's failure is a reset libcurl did not report as one: the proxy reset
        # it and it was handed over (handover.py), or its socket showed it (RequestLimit.mark_reset).
        self.reset = ""
        self.fresh = False  # sent again on a new connection (FRESH_CONNECT)
        self.sends = 0  # times libcurl sent the request (again itself: a GOAWAY refused it, or a connection died)
        self.resent: list[str] = []  # why libcurl sent it again, each time (retire.py)

    # -- libcurl callbacks (inside socket_action) --

    def on_header(self, line: bytes) -> int | None:
        # libcurl calls this once per line (pycurl has no call per header block), about nine
        # times per response: a field line of the block being received (its status line already
        # kept, so ``lines`` is not empty) is only counted and kept; the fields are split once,
        # when the block ends (_block_ended). Everything else goes through _other_line.
        lines = self.lines
        if len(line) > 2 and lines and not self.ready:
            self.header_bytes += len(line)
            if self.header_bytes > self.max_header_bytes:
                return self._too_large()
            lines.append(line)
            return None
        return self._other_line(line)

    def _other_line(self, line: bytes) -> int | None:
        if self.ready:
            return None  # trailers: not part of the response httpx sees
        if line[:5] == b"HTTP/":
            version, _, rest = line.partition(b" ")
            self.version, self.status = version.rstrip(b"\r\n"), int(rest[:3] or b"0")
            self.lines = [line]
            self.header_bytes = 0
            return None
        if line in (b"\r\n", b"\n"):
            self._block_ended()
            return None
        self.header_bytes += len(line)
        if self.header_bytes > self.max_header_bytes:
            return self._too_large()
        self.lines.append(line)
        return None

    def _too_large(self) -> int:
        self.error = FetchFailed(ErrorKind.TOO_LARGE, f"response header block over {self.max_header_bytes} bytes")
        return -1  # libcurl ends the transfer (CURLE_WRITE_ERROR)

    def _block_ended(self) -> None:
        if self.before_write is not None:
            self.before_write(self)
        lines, self.lines = self.lines, []
        if self.status < 200:
            return  # an interim (1xx) block
        if self.tunnel and self.opened and not self.t_tunnel:
            # The first final block on a connection this request opened through an HTTP
            # proxy is the proxy's answer to CONNECT, not the target's response.
            self.t_tunnel = time.monotonic()
            return
        if self.tls_handle:
            self.tls_version = tls.version(self.tls_handle)
        headers = self.headers
        for field in lines[1:] if lines and lines[0][:5] == b"HTTP/" else lines:
            name, colon, value = field.partition(b":")
            if colon:
                headers.append((name.strip(), value.strip()))
        self.ready = True
        if not self.headers_ready.done():  # cancelled by its caller, which is stopping the transfer
            self.headers_ready.set_result(None)

    def on_body(self, data: bytes) -> int | None:
        if self.buffered >= BUFFER_BYTES:
            self.paused = True
            return pycurl.WRITEFUNC_PAUSE  # libcurl keeps ``data`` and delivers it again after unpausing
        self.chunks.append(data)
        self.buffered += len(data)
        self._wake()
        return None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- in the event loop --

    def finished(self, error: BaseException | None) -> None:
        """libcurl is done with the transfer (``error`` None: completed); wakes the reader."""
        if self.done:
            return
        self.done = True
        if error is not None and self.error is None:
            self.error = error
        if not self.headers_ready.done():
            if self.error is not None:
                self.headers_ready.set_exception(self.error)
            else:  # a response without a final header block cannot complete; say so anyway
                self.headers_ready.set_exception(httpx.RemoteProtocolError("no response", request=self.request))
        self._wake()
        self.release(self)

    def chunk(self) -> bytes | None:
        """The bytes buffered so far (None when none); lets a paused transfer go on."""
        if not self.chunks:
            return None
        data = b"".join(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        self.chunks.clear()
        self.buffered = 0
        if self.paused and not self.done:
            self.paused = False
            # Fails when libcurl already ended the transfer (its completion is queued and says why).
            with contextlib.suppress(pycurl.error):
                self.easy.pause(pycurl.PAUSE_CONT)
        return data

    async def more(self) -> None:
        """Wait until a body chunk arrives or the transfer ends (libcurl's low-speed limit
        bounds the wait: ``read`` timeout)."""
        waiter = self.waiter = self.headers_ready.get_loop().create_future()
        try:
            await waiter
        finally:
            self.waiter = None


class Body(httpx.AsyncByteStream):
    """The response body as httpx reads it: chunks as libcurl delivers them; closing it early
    (or a cancellation while reading) stops the transfer at once."""

    __slots__ = ("_abort", "_exchange")

    def __init__(self, exchange: Exchange, abort: Callable[[Exchange], None]) -> None:
        self._exchange = exchange
        self._abort = abort

    async def __aiter__(self) -> AsyncIterator[bytes]:
        ex = self._exchange
        try:
            while True:
                data = ex.chunk()
                if data is not None:
                    yield data
                elif ex.error is not None:
                    raise ex.error
                elif ex.done:
                    return
                else:
                    await ex.more()
        except BaseException:
            self._abort(ex)
            raise

    async def aclose(self) -> None:
        self._abort(self._exchange)


class PeerInfo:
    """httpcore's ``network_stream`` response extension, as far as libcurl tells it: the peer's
    address (the target's, or the proxy's) and the TLS version of the connection to the target
    (``ssl_object``: only its ``version()``; None without TLS or when not read, see ``tls.py``)."""

    __slots__ = ("_address", "_tls")

    def __init__(self, address: tuple[str, int], tls_version: str = "") -> None:
        self._address = address
        self._tls = _TlsSession(tls_version) if tls_version else None

    def get_extra_info(self, info: str) -> Any:
        if info == "server_addr":
            return self._address
        return self._tls if info == "ssl_object" else None


class _TlsSession:
    """What fetchpool reads of an ``ssl.SSLObject``: its ``version()``."""

    __slots__ = ("_version",)

    def __init__(self, version: str) -> None:
        self._version = version

    def version(self) -> str:
        return self._version
