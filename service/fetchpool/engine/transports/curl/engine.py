"""One libcurl multi handle as an httpx transport: the curl transport's verified connections,
or its ``tls_insecure_skip_verify`` ones.

- Connections: at most ``max_connections`` sockets (``CURLMOPT_MAX_TOTAL_CONNECTIONS``; per
  origin ``max_connections_per_host``), HTTP/2 multiplexed; ``PIPEWAIT`` makes a burst wait for
  the one connection being opened instead of opening one per request, and the first request to
  a cold origin goes alone (``cold.py``): libcurl assumes 100 streams until the
  server's SETTINGS arrive, so a burst on a new connection would overshoot a smaller limit and
  nginx refuses the excess (and closes the connection past twice its limit). For an https origin
  that answers HTTP/1.1 only, the first response is so waited for once per origin.
- Idle connections: kept at most ``max_keepalive_connections`` (``CURLMOPT_MAXCONNECTS``), for
  ``keepalive_expiry`` seconds (``MAXAGE_CONN``), retired at ``max_connection_age``
  (``MAXLIFETIME_CONN``) or after ``max_requests_per_connection`` requests (``retire.py``).
- The SSRF guard (direct pools): the target's name is resolved here, every address checked
  (``TargetGuard.resolve``, ``pins.py``), and libcurl is given those addresses
  (``CURLOPT_RESOLVE``), so it never resolves a name itself; OPENSOCKETFUNCTION refuses any
  other address before a socket exists, on every hop (redirects are separate requests).
- Timeouts: connect (``CONNECTTIMEOUT_MS``); between reads, libcurl's low-speed limit (under
  1 byte/s for ``read`` seconds, whole seconds); the fetch's total deadline is the engine's.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from typing import Any

import httpx
import pycurl

from fetchpool.config import PoolLimits, PoolPolicy
from fetchpool.engine.guard import TargetGuard
from fetchpool.engine.transports.base import RECORDER_EXTENSION
from fetchpool.engine.transports.curl import facts, tls
from fetchpool.engine.transports.curl.cold import ColdOrigins
from fetchpool.engine.transports.curl.driver import Multi
from fetchpool.engine.transports.curl.exchange import Body, Exchange, PeerInfo
from fetchpool.engine.transports.curl.handover import PROXIED_RECEIVE_BUFFER, reset_local
from fetchpool.engine.transports.curl.ledger import Ledger
from fetchpool.engine.transports.curl.pins import Pins
from fetchpool.engine.transports.curl.retire import RequestLimit
from fetchpool.engine.transports.curl.streams import StreamCap, trace_enabled

# Headers libcurl writes itself (Host from the URL, framing from the body): httpx's copies would
# be sent twice (nginx answers an HTTP/2 request with two Host headers with 400).
_OWN = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})


class CurlEngine(httpx.AsyncBaseTransport):
    """See the module docstring. ``verify`` False skips certificate checks; ``proxy`` is a
    proxy URL (credentials allowed); ``guard`` checks every target address (direct pools)."""

    def __init__(self, *, ca_bundle: str, verify: bool, proxy: str | None, guard: TargetGuard | None,
                 limits: PoolLimits, policy: PoolPolicy, max_header_bytes: int) -> None:
        self._ca_bundle = ca_bundle
        self._verify = verify
        # socks5:// is resolved by the proxy, as httpx's SOCKS transport does.
        self._proxy = "socks5h://" + proxy[len("socks5://"):] if proxy and proxy.startswith("socks5://") else proxy
        self._tunnels = bool(proxy) and proxy.startswith(("http://", "https://"))  # type: ignore[union-attr]
        self._pins = Pins(guard) if guard is not None else None
        self._limits = limits
        self._policy = policy
        self._max_header_bytes = max_header_bytes
        self._multi: Multi | None = None
        self._free: list[_Easy] = []
        self._opening: dict[pycurl.Curl, Exchange] = {}  # easy -> the exchange it serves now
        self.in_flight: set[Exchange] = set()
        self.ledger = Ledger()
        self.retired = 0
        self._cold = ColdOrigins()
        self._limit = RequestLimit(policy.max_requests_per_connection, self._resend, self.ledger)
        self._traced: set[pycurl.Curl] = set()  # easy handles with VERBOSE on (streams.py)
        self.streams = StreamCap(lambda: self.set_limits(self._limits))  # streams per connection (streams.py)

    # -- the request --

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):  # as httpx's own transport (libcurl speaks FTP, ...)
            raise httpx.UnsupportedProtocol(f"request URL has an unsupported scheme {url.scheme!r}", request=request)
        host = url.raw_host.decode("ascii")
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses, resolve = await self._pins.pin(host, port) if self._pins is not None else (None, "")
        opener = await self._cold.wait((url.scheme, host, port)) if url.scheme == "https" else None
        if self._multi is None:
            self._multi = self._new_multi()
        multi = self._multi
        easy = self._free.pop() if self._free else self._new_easy()
        ex = Exchange(easy, request, multi.loop, tunnel=self._tunnels and url.scheme == "https", addresses=addresses,
                      max_header_bytes=self._max_header_bytes, release=self._release,
                      before_write=self._before_write if self._proxy else None,
                      tls_handle=easy.handle if url.scheme == "https" else 0)
        ex.recorder = request.extensions.get(RECORDER_EXTENSION)
        self._prepare(ex, request, resolve)
        if opener is not None and trace_enabled():  # the origin's first connection: learn its streams
            easy.setopt(pycurl.VERBOSE, 1)
            self._traced.add(easy)
        self._opening[easy] = ex
        try:
            multi.add(easy)
        except BaseException:
            self._opening.pop(easy, None)
            self._free.append(easy)
            raise
        self.in_flight.add(ex)
        if opener is not None:
            ex.headers_ready.add_done_callback(opener)
        try:
            await ex.headers_ready
        except asyncio.CancelledError:
            self._let_go(ex)
            self.abort(ex)
            raise
        except BaseException:
            self._let_go(ex)
            raise
        facts.report(ex)
        self._note_use(ex)
        peer = PeerInfo((easy.getinfo(pycurl.PRIMARY_IP), easy.getinfo(pycurl.PRIMARY_PORT)), ex.tls_version)
        self._let_go(ex)
        return httpx.Response(ex.status, headers=ex.headers, stream=Body(ex, self.abort),
                              extensions={"http_version": ex.version, "network_stream": peer})

    def _let_go(self, ex: Exchange) -> None:
        """The request's coroutine read what it needs from the easy handle (see _release)."""
        ex.held = False
        if ex.done:
            self._release(ex)

    def _finished(self, easy: pycurl.Curl, failed: pycurl.error | None) -> None:
        """libcurl completed (``failed`` None) or failed the transfer of ``easy``: report the
        outcome; the easy handle can serve another request."""
        ex = self._opening[easy]
        if ex.done:
            return
        if RequestLimit.held_back(ex, failed):
            # Not sent: a connection at its request limit (retire.py). It goes again once the
            # transfers on that connection ended, or now.
            if not self._limit.wait(ex):
                self._resend([ex])
            return
        error = None
        if failed is not None:
            if not ex.headers_ready.done():
                facts.report(ex, failed)
            if ex.on is not None and self._reset(ex.on, failed):
                # libcurl fails the other streams of the connection as cut short ("unexpected
                # eof"); they were reset too (httpcore says so for each: the same retry reason).
                self._limit.mark_reset(ex.on, "seen on the connection's socket")
            error = facts.to_exception(failed, ex)
        else:
            facts.report(ex)
        ex.finished(error)

    def _resend(self, exchanges: list[Exchange]) -> None:
        """Send again transfers held back at a connection's request limit (retire.py)."""
        for ex in exchanges:
            if ex.done or self._multi is None:
                continue  # stopped meanwhile (a cancellation, the pool closed)
            ex.opened = 0
            ex.t0 = time.monotonic()  # libcurl times the new transfer from now
            if ex.fresh:
                ex.easy.setopt(pycurl.FRESH_CONNECT, 1)  # reset when the handle is free again
            try:
                self._multi.add(ex.easy)
            except pycurl.error as exc:
                ex.finished(facts.to_exception(exc, ex))

    def abort(self, ex: Exchange) -> None:
        """Stop a transfer now (a cancellation, a body closed early): libcurl resets its HTTP/2
        stream, or closes its HTTP/1.1 connection mid-response; the easy handle is reusable."""
        if ex.done:
            return
        if self._multi is not None:
            self._multi.remove(ex.easy)
        ex.finished(httpx.ReadError("the transfer was stopped", request=ex.request))

    def _release(self, ex: Exchange) -> None:
        """``ex`` is finished: the request is no longer in flight and its easy handle may serve
        another, unless the request's coroutine has yet to read the transfer's facts from it
        (``ex.held``): libcurl completes a transfer inside the ``socket_action`` that received its
        last bytes, before that coroutine resumes, and the handle must not be taken by another
        request (or closed by an upkeep that saw nothing in flight) in between."""
        self._resend(self._limit.ended(ex))
        if ex.held:
            return
        self.in_flight.discard(ex)
        if self._opening.get(ex.easy) is ex:
            del self._opening[ex.easy]
            if ex.fresh:
                ex.easy.setopt(pycurl.FRESH_CONNECT, 0)
            if ex.easy in self._traced:
                self._traced.discard(ex.easy)
                ex.easy.setopt(pycurl.VERBOSE, 0)
            self._free.append(ex.easy)

    def _before_write(self, ex: Exchange) -> None:
        """At a response's headers, inside libcurl, which writes next: a connection this
        request opened is known to speak HTTP/2 from now on, and a connection a proxy has
        ended is handed over first (``handover.py``)."""
        if ex.opened and ex.version == b"HTTP/2":
            connection = self.ledger.get(ex.fd)
            if connection is not None:
                connection.version = "HTTP/2"
        self._multi.hand_over_closed()  # type: ignore[union-attr]

    def tunnel_multiplexed(self, fd: int) -> bool:
        """``handover.Tunnels``: whether proxied socket ``fd`` speaks HTTP/2."""
        connection = self.ledger.get(fd)
        return connection is not None and connection.version == "HTTP/2"

    def tunnel_reset(self, local: tuple[str, int]) -> None:
        """``handover.Tunnels``: the transfers on the connection a proxy reset fail as reset."""
        self._limit.mark_reset(local, "the proxy's, after what it sent was read")

    def _reset(self, local: tuple[str, int], failed: pycurl.error) -> bool:
        """Whether the connection from ``local`` that failed a transfer was reset: libcurl read
        the reset, or cut the transfer short on a socket the kernel says was reset (a stream
        that wrote first gets "SSL_ERROR_SYSCALL, errno 0", the others "unexpected eof")."""
        return facts.read_reset(failed) or (facts.cut_short(failed) and self._limit.was_reset(local))

    def _socket_removed(self, fd: int) -> None:
        """libcurl is done with socket ``fd`` (it may close it next): if its connection was
        reset, the transfers on it fail as reset (they are failed, or sent again, after this)."""
        local = reset_local(fd)
        if local is not None:
            self._limit.mark_reset(local, "seen on the connection's socket")

    def _note_use(self, ex: Exchange) -> None:
        connection = self.ledger.get(ex.fd)
        if connection is None:
            return
        connection.last_used = time.monotonic()
        connection.version = ex.version.decode("ascii")

    @property
    def retired_total(self) -> int:
        """Connections closed at the upkeep's word or at their request limit."""
        return self.retired + self._limit.retired

    def _prereq(self, easy: pycurl.Curl, local_ip: str, local_port: int) -> int:
        ex = self._opening.get(easy)
        return pycurl.PREREQFUNC_OK if ex is None else self._limit.prereq(ex, local_ip, local_port)

    # -- the guard --

    def _open_socket(self, easy: pycurl.Curl, purpose: int, address: Any) -> Any:
        ex = self._opening.get(easy)
        ip = address.addr[0]
        if ex is not None and ex.addresses is not None and ip not in ex.addresses:
            ex.refused = ip
            return pycurl.SOCKET_BAD
        if ex is not None:
            ex.opened += 1
        sock = socket.socket(address.family, address.socktype, address.protocol)
        if self._proxy:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PROXIED_RECEIVE_BUFFER)
        return _Handed(sock)

    def _socket_made(self, easy: pycurl.Curl, fd: int, purpose: int) -> int:
        self.ledger.opened(fd, time.monotonic())
        ex = self._opening.get(easy)
        if ex is not None:
            ex.fd = fd
        return 0

    # -- handles --

    def _new_multi(self) -> Multi:
        multi = Multi(self._finished, on_remove=self._socket_removed, tunnels=self if self._proxy else None)
        multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
        self._apply(multi)
        return multi

    def _apply(self, multi: Multi) -> None:
        limits = self._limits
        multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, limits.max_connections)
        multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, limits.max_connections_per_host)
        multi.setopt(pycurl.M_MAXCONNECTS, max(1, limits.max_keepalive_connections))
        if self.streams.cap:
            multi.setopt(pycurl.M_MAX_CONCURRENT_STREAMS, self.streams.cap)

    def set_limits(self, limits: PoolLimits) -> None:
        """New transfers obey ``limits``; open connections are not cut."""
        self._limits = limits
        if self._multi is not None:
            self._apply(self._multi)

    def _new_easy(self) -> _Easy:
        easy = _Easy()
        s = easy.setopt
        s(pycurl.NOSIGNAL, 1)
        s(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_2TLS)
        s(pycurl.HTTP_CONTENT_DECODING, 0)  # fetchpool decodes within the body cap
        s(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        s(pycurl.CAINFO, self._ca_bundle)
        if not self._verify:
            s(pycurl.SSL_VERIFYPEER, 0)
            s(pycurl.SSL_VERIFYHOST, 0)
        s(pycurl.OPENSOCKETFUNCTION, lambda purpose, address: self._open_socket(easy, purpose, address))
        s(pycurl.SOCKOPTFUNCTION, lambda fd, purpose: self._socket_made(easy, fd, purpose))
        if self._proxy:
            s(pycurl.PROXY, self._proxy)
        s(pycurl.PREREQFUNCTION, lambda _ip, local_ip, _port, local_port: self._prereq(easy, local_ip, local_port))
        s(pycurl.DEBUGFUNCTION, self.streams.debug)  # called only while VERBOSE is on (streams.py)
        return easy

    def _prepare(self, ex: Exchange, request: httpx.Request, resolve: str) -> None:
        """Set the options of ``ex``'s transfer. An easy handle keeps its options from one
        transfer to the next, so those that are most often the same as last time (the request
        headers, the method, timeouts and limits) are set only when they changed."""
        easy: _Easy = ex.easy  # type: ignore[assignment]
        s = easy.setopt
        s(pycurl.URL, str(request.url))
        s(pycurl.HEADERFUNCTION, ex.on_header)
        s(pycurl.WRITEFUNCTION, ex.on_body)
        raw = request.headers.raw
        if raw != easy.raw_headers:
            easy.raw_headers = raw
            headers = [b"%s: %s" % (k, v) for k, v in raw if k.lower() not in _OWN]
            headers.append(b"Expect:")  # no 100-continue round trip
            s(pycurl.HTTPHEADER, headers)
        method = request.method
        if method != easy.method or method not in ("GET", "HEAD"):
            easy.method = method
            body = request.content if method not in ("GET", "HEAD") else b""
            if method == "HEAD":
                s(pycurl.NOBODY, 1)
            else:
                s(pycurl.HTTPGET, 1)  # also clears NOBODY and a previous body
            if body:
                s(pycurl.POSTFIELDSIZE, len(body))
                s(pycurl.COPYPOSTFIELDS, body)
            s(pycurl.CUSTOMREQUEST, None if method in ("GET", "HEAD") or (method == "POST" and body) else method)
        timeouts = request.extensions.get("timeout") or {}
        settings = (request.url.scheme, timeouts.get("connect"), timeouts.get("read"), resolve, self._limits,
                    self._policy)
        if settings != easy.settings:
            easy.settings = settings
            self._set(easy, *settings)

    def _set(self, easy: pycurl.Curl, scheme: str, connect: float | None, read: float | None, resolve: str,
             limits: PoolLimits, policy: PoolPolicy) -> None:
        s = easy.setopt
        # Only https can turn out HTTP/2; over plain HTTP/1.1 libcurl would wait for a first
        # response before it opens a second connection to the origin.
        s(pycurl.PIPEWAIT, scheme == "https")
        s(pycurl.CONNECTTIMEOUT_MS, int(connect * 1000) if connect else 0)
        s(pycurl.LOW_SPEED_LIMIT, 1 if read else 0)
        s(pycurl.LOW_SPEED_TIME, max(1, math.ceil(read)) if read else 0)
        s(pycurl.RESOLVE, [resolve] if resolve else [])
        s(pycurl.MAXAGE_CONN, max(1, math.ceil(limits.keepalive_expiry)))
        s(pycurl.MAXLIFETIME_CONN, math.ceil(policy.max_connection_age))
        s(pycurl.FORBID_REUSE, 0 if limits.max_keepalive_connections else 1)

    async def close_idle(self) -> int:
        """Close every connection, when no request is in flight (libcurl has no call that
        closes idle connections only); returns how many were open and not retired already."""
        if self.in_flight or self._multi is None:
            return 0
        count = sum(not c.retired for c in self.ledger.alive())
        await self.aclose()
        return count

    async def aclose(self) -> None:
        multi, self._multi = self._multi, None
        if multi is not None:
            multi.close()  # libcurl closes every connection it holds
        for ex in list(self.in_flight):
            ex.finished(httpx.ReadError("the pool was closed", request=ex.request))
        # Handles still held by a request's coroutine (see _release) come back later: they are
        # closed when collected.
        for easy in self._free:
            easy.close()
        self._free.clear()
        self._cold.clear()
        self.ledger.forget()

    async def __aexit__(self, *args: Any) -> None:
        await self.aclose()


class _Easy(pycurl.Curl):
    """An easy handle, and what was set on it for its last transfer (see CurlEngine._prepare)."""

    __slots__ = ("handle", "method", "raw_headers", "settings")

    def __init__(self) -> None:
        super().__init__()
        self.handle = tls.easy_handle(self)  # its CURL *, to read the TLS version with (0: cannot)
        self.raw_headers: list[tuple[bytes, bytes]] | None = None
        self.method = ""
        self.settings: tuple[Any, ...] | None = None


class _Handed:
    """A socket handed to libcurl: pycurl duplicates ``fileno()``; ours is closed once it has."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def __del__(self) -> None:
        self.sock.close()
