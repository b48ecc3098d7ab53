"""Pool connections that open once, fail together, and leave no socket behind.

httpcore's connection classes (direct, HTTP-proxy tunnel, SOCKS5) each open their socket in
their own way, and each mishandles a failure or a cancellation in its own way (httpcore 1.0.9):
a cancelled TLS handshake leaves its TCP socket open (``AnyIOStream.start_tls`` closes on
``Exception`` only); a tunnel whose CONNECT or TLS failed stays in the pool as a busy
connection for good; a SOCKS5 connection cancelled while opening stays "CONNECTING" for good;
and the requests waiting for a connection that failed to open each open it again, one after
the other, on an object the pool has already dropped, whose socket then belongs to nobody.

:class:`PoolConnection` opens its stream once, through an *opener* (:func:`open_direct`,
:func:`open_tunnel`, :func:`open_socks5`) that closes whatever it opened when it fails or is
cancelled. The requests that waited for it share the outcome, as Go's transport shares a dial:
a failure is theirs too (:class:`OpenFailed`, which says at which step), and an opening
abandoned by its cancelled request sends them back to the pool for another connection.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpcore
import socksio
from httpcore import URL, AsyncNetworkBackend, AsyncNetworkStream, ConnectionNotAvailable, Origin, Request, Response
from httpcore._async.http11 import AsyncHTTP11Connection
from httpcore._async.http_proxy import AsyncForwardHTTPConnection, merge_headers
from httpcore._async.socks_proxy import _init_socks5_connection
from httpcore._trace import Trace

from fetchpool.engine._httpcore.h2 import GracefulHTTP2Connection
from fetchpool.engine._httpcore.h2_support import reserve_receive_buffer, stream_info
from fetchpool.engine._httpcore.limits import OriginKey, RequestLimits, remember
from fetchpool.engine._httpcore.shield import shielded

# httpcore's loggers, so trace events keep httpcore's names ("connection.connect_tcp", ...).
_DIRECT = logging.getLogger("httpcore.connection")
_PROXY = logging.getLogger("httpcore.proxy")
_SOCKS = logging.getLogger("httpcore.socks")


class Step:
    """The step an opening is at: ``connect``, ``proxy.connect`` or ``tls`` (the phase names
    of :mod:`fetchpool.engine.phases`)."""

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = "connect"


class OpenFailed(httpcore.ConnectError):
    """The connection a request waited for failed to open (raised to the waiting requests;
    the request that opened it gets the original exception). ``cause`` is that exception
    and ``step`` the step it failed at."""

    def __init__(self, cause: BaseException, step: str) -> None:
        super().__init__(f"the connection this request waited for failed at {step}: {cause}")
        self.cause = cause
        self.step = step


async def _close_on_failure(stream: AsyncNetworkStream, operation: Awaitable[Any]) -> Any:
    try:
        return await operation
    except BaseException:
        await shielded(stream.aclose())
        raise


async def open_direct(request: Request, step: Step, *, origin: Origin, backend: AsyncNetworkBackend,
                      ssl_context: ssl.SSLContext | None, alpn: list[str],
                      logger: logging.Logger = _DIRECT) -> AsyncNetworkStream:
    """TCP to ``origin`` (through ``backend``: the SSRF guard for direct pools), then TLS for
    https (``ssl_context`` None: Python's default context)."""
    timeout = request.extensions.get("timeout", {}).get("connect")
    kwargs = {"host": origin.host.decode("ascii"), "port": origin.port, "local_address": None, "timeout": timeout,
              "socket_options": None}
    async with Trace("connect_tcp", logger, request, kwargs) as trace:
        stream = await backend.connect_tcp(**kwargs)  # type: ignore[arg-type]
        trace.return_value = stream
    reserve_receive_buffer(stream)
    if origin.scheme != b"https":
        return stream
    server_hostname = request.extensions.get("sni_hostname") or origin.host.decode("ascii")
    return await _start_tls(request, step, stream, ssl_context, server_hostname, alpn, logger)


async def _start_tls(request: Request, step: Step, stream: AsyncNetworkStream, ssl_context: ssl.SSLContext | None,
                     server_hostname: str, alpn: list[str], logger: logging.Logger) -> AsyncNetworkStream:
    step.name = "tls"
    if ssl_context is None:
        ssl_context = ssl.create_default_context()
    # ALPN is copied into each TLS connection when it is made, right below (httpcore's way too).
    ssl_context.set_alpn_protocols(alpn)
    kwargs = {"ssl_context": ssl_context, "server_hostname": server_hostname,
              "timeout": request.extensions.get("timeout", {}).get("connect")}
    async with Trace("start_tls", logger, request, kwargs) as trace:
        tls: AsyncNetworkStream = await _close_on_failure(stream, stream.start_tls(**kwargs))  # type: ignore[arg-type]
        trace.return_value = tls
    return tls


async def open_tunnel(request: Request, step: Step, *, proxy: Origin, proxy_headers: list[tuple[bytes, bytes]],
                      proxy_ssl_context: ssl.SSLContext | None, target: Origin, backend: AsyncNetworkBackend,
                      ssl_context: ssl.SSLContext, alpn: list[str]) -> AsyncNetworkStream:
    """TCP (and TLS, for an https proxy) to ``proxy``, HTTP CONNECT to ``target``, then TLS to it.

    Raises ``httpcore.ProxyError`` ("<status> <reason>") when the proxy refuses the tunnel.
    """
    stream = await open_direct(request, step, origin=proxy, backend=backend, ssl_context=proxy_ssl_context,
                               alpn=["http/1.1"])
    step.name = "proxy.connect"
    authority = b"%b:%d" % (target.host, target.port)
    # The CONNECT exchange is part of opening the connection: bounded by the connect timeout,
    # not by the read timeout meant for the target's answers (httpcore used the latter).
    timeouts = request.extensions.get("timeout", {})
    connect_timeouts = {**timeouts, "read": timeouts.get("connect"), "write": timeouts.get("connect")}
    connect = Request(
        b"CONNECT", URL(scheme=proxy.scheme, host=proxy.host, port=proxy.port, target=authority),
        headers=merge_headers([(b"Host", authority), (b"Accept", b"*/*")], proxy_headers),
        extensions={**request.extensions, "timeout": connect_timeouts},
    )
    response = await _close_on_failure(stream, AsyncHTTP11Connection(proxy, stream).handle_async_request(connect))
    if not 200 <= response.status <= 299:
        await shielded(stream.aclose())
        reason = response.extensions.get("reason_phrase", b"").decode("ascii", errors="ignore")
        raise httpcore.ProxyError(f"{response.status} {reason}")
    return await _start_tls(request, step, stream, ssl_context, target.host.decode("ascii"), alpn, _PROXY)


async def open_socks5(request: Request, step: Step, *, proxy: Origin, auth: tuple[bytes, bytes] | None,
                      target: Origin, backend: AsyncNetworkBackend, ssl_context: ssl.SSLContext,
                      alpn: list[str]) -> AsyncNetworkStream:
    """TCP to the SOCKS5 ``proxy``, its handshake for ``target``, then TLS for https targets."""
    stream = await open_direct(request, step, origin=Origin(b"socks5", proxy.host, proxy.port), backend=backend,
                               ssl_context=ssl_context, alpn=alpn, logger=_SOCKS)
    step.name = "proxy.connect"
    kwargs = {"stream": stream, "host": target.host.decode("ascii"), "port": target.port, "auth": auth}
    timeout = request.extensions.get("timeout", {}).get("connect")
    async with Trace("setup_socks5_connection", _SOCKS, request, kwargs) as trace:
        try:  # httpcore reads the proxy's replies with no timeout at all
            async with asyncio.timeout(timeout):
                await _close_on_failure(stream, _init_socks5_connection(**kwargs))  # type: ignore[arg-type]
        except socksio.ProtocolError as exc:  # a reply cut short or garbled: the proxy's failure
            raise httpcore.ProxyError(f"SOCKS5 handshake failed: {exc}") from exc
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"the SOCKS5 handshake took over {timeout:g} s") from None
        trace.return_value = stream
    if target.scheme != b"https":
        return stream
    server_hostname = request.extensions.get("sni_hostname") or target.host.decode("ascii")
    return await _start_tls(request, step, stream, ssl_context, server_hostname, alpn, _SOCKS)


class _CountedUntilClosed:
    """An HTTP/1.1 or HTTP/2 connection that says it is ``closing`` until its socket is closed.

    httpcore marks a connection CLOSED before it closes the socket, and asyncio closes the
    descriptor on the loop's next turn (anyio's close waits for that turn). In between the pool
    would count one connection fewer than the OS shows (``PoolConnection.socket_open``).
    """

    closing = False

    async def aclose(self) -> None:
        self.closing = True
        try:
            await super().aclose()  # type: ignore[misc]
        finally:
            self.closing = False


class _HTTP11Connection(_CountedUntilClosed, AsyncHTTP11Connection):
    pass


class _HTTP2Connection(_CountedUntilClosed, GracefulHTTP2Connection):
    pass


class PoolConnection(httpcore.AsyncConnectionInterface):
    """One pooled connection to ``origin``: opened by the first request assigned to it, then
    HTTP/1.1 or HTTP/2 as ALPN says.

    While it opens, more requests may wait for it when it may turn out HTTP/2 (an https origin
    not known to answer HTTP/1.1 only), so a burst shares one connection instead of opening one
    each; ``protocols`` is the pool's memory of what each origin negotiated.
    """

    def __init__(self, origin: Origin, opener: Callable[[Request, Step], Awaitable[AsyncNetworkStream]], *,
                 http2: bool, keepalive_expiry: float | None, protocols: MutableMapping[OriginKey, bool],
                 max_requests: int = 0, learned: RequestLimits | None = None) -> None:
        self._origin = origin
        self._key = (origin.scheme, origin.host, origin.port)
        self._opener = opener
        self._http2 = http2
        self._keepalive_expiry = keepalive_expiry
        self._protocols = protocols
        self._connection: httpcore.AsyncConnectionInterface | None = None
        self._failure: BaseException | None = None
        self._step = Step()
        self._lock = asyncio.Lock()
        self._entering = 0  # requests inside handle_async_request
        self._max_requests = max_requests  # 0: no limit
        self._learned = learned if learned is not None else RequestLimits()
        self._started = 0
        self._promised = 0
        self._retiring = False

    async def handle_async_request(self, request: Request) -> Response:
        # Until its stream is open, a request's connection may still look idle: keep the pool's
        # idle clean-up (keep-alive cap, the upkeep) from closing it under the request.
        if self.retiring:
            raise ConnectionNotAvailable()  # the pool takes the request to another connection
        self._started += 1
        self._entering += 1
        try:
            if self._connection is None:
                await self._open(request)
            assert self._connection is not None
            return await self._connection.handle_async_request(request)
        finally:
            self._entering -= 1

    async def _open(self, request: Request) -> None:
        async with self._lock:
            if self._connection is not None:
                return
            if self._failure is not None:
                if isinstance(self._failure, asyncio.CancelledError | ConnectionNotAvailable):
                    raise ConnectionNotAvailable()  # abandoned: the pool finds this request another
                raise OpenFailed(self._failure, self._step.name)
            try:
                stream = await self._opener(request, self._step)
            except BaseException as exc:
                self._failure = exc
                raise
            if self._failure is not None:  # closed by the pool while it opened
                await shielded(stream.aclose())
                raise ConnectionNotAvailable()
            ssl_object = stream_info(stream, "ssl_object")
            http2 = ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"
            self._remember(http2)
            if http2:
                self._connection = _HTTP2Connection(
                    origin=self._origin, stream=stream, keepalive_expiry=self._keepalive_expiry,
                    on_refusing_goaway=functools.partial(self._learned.refused_after, self._key))
            else:
                self._connection = _HTTP11Connection(origin=self._origin, stream=stream,
                                                     keepalive_expiry=self._keepalive_expiry)

    def _remember(self, http2: bool) -> None:
        if self._origin.scheme != b"https":
            return
        remember(self._protocols, self._key, http2)

    def _request_limit(self) -> int:
        """``max_requests`` or the limit learned for its origin (``limits.py``), the lower; 0: none."""
        learned = self._learned.limit(self._key)
        if not (learned and self._max_requests):
            return learned or self._max_requests
        return min(learned, self._max_requests)

    def promise(self) -> None:
        """The pool assigned it a request (see :meth:`unpromised`)."""
        self._promised += 1

    def unpromised(self) -> int | None:
        """Requests the pool may still assign to it under its request limit (those it was
        assigned count, even when one went elsewhere after all); None without a limit."""
        limit = self._request_limit()
        return max(0, limit - self._promised) if limit else None

    @property
    def retiring(self) -> bool:
        """Whether it takes no new request: :meth:`retire` was called, or it started its last
        (its request limit, counted as requests start, so HTTP/2 streams cannot overshoot it)."""
        return self._retiring or 0 < self._request_limit() <= self._started

    def retire(self) -> None:
        """Take no new request; those in flight finish (the pool closes it once idle)."""
        self._retiring = True

    @property
    def opened(self) -> bool:
        """Whether its socket is open (or was: see ``is_closed``)."""
        return self._connection is not None

    @property
    def network_stream(self) -> AsyncNetworkStream | None:
        """The socket's stream once opened (HTTP/1.1 or HTTP/2 connection's ``_network_stream``)."""
        return getattr(self._connection, "_network_stream", None)

    @property
    def connection(self) -> httpcore.AsyncConnectionInterface | None:
        """The HTTP/1.1 or HTTP/2 connection, once opened."""
        return self._connection

    @property
    def socket_open(self) -> bool:
        """Whether its socket is open (or opening): unlike ``not is_closed()``, still true while
        the connection closes it."""
        inner = self._connection
        if inner is None:
            return self._failure is None
        return not inner.is_closed() or (isinstance(inner, _CountedUntilClosed) and inner.closing)

    def can_handle_request(self, origin: Origin) -> bool:
        return origin == self._origin

    async def aclose(self) -> None:
        if self._connection is not None:
            await self._connection.aclose()
        elif self._failure is None:
            self._failure = ConnectionNotAvailable()

    def is_available(self) -> bool:
        if self.retiring:
            return False
        if self._connection is not None:
            return self._connection.is_available()
        return (self._failure is None and self._http2 and self._origin.scheme == b"https"
                and self._protocols.get(self._key, True))

    def has_expired(self) -> bool:
        return self._connection.has_expired() if self._connection is not None else self._failure is not None

    def is_idle(self) -> bool:
        return self._connection is not None and not self._entering and self._connection.is_idle()

    def is_closed(self) -> bool:
        return self._connection.is_closed() if self._connection is not None else self._failure is not None

    def info(self) -> str:
        if self._connection is not None:
            return self._connection.info()
        return "CONNECTION FAILED" if self._failure is not None else "CONNECTING"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} [{self.info()}]>"


class ForwardConnection(AsyncForwardHTTPConnection):
    """httpcore's plain-HTTP forwarding through a proxy (absolute-form requests), over a
    :class:`PoolConnection` to the proxy."""

    def __init__(self, inner: PoolConnection, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._connection = inner  # type: ignore[assignment]

    @property
    def inner(self) -> PoolConnection:
        """The connection to the proxy."""
        assert isinstance(self._connection, PoolConnection)
        return self._connection
