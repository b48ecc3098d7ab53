"""One exception tree, the error kinds, and the one table that maps them.

Library exceptions (httpx, httpcore, h2, ssl, OS errors) are translated into an
:class:`ErrorKind` once, in :func:`classify`, the way httpx translates httpcore's
exceptions in one place (``httpx._transports.default.map_httpcore_exceptions``).
The numeric values of :class:`ErrorKind` are those of ``fetchpool.v1.FetchError.Kind``
(a test keeps them equal).

httpx, httpcore, h2 and idna are imported by :func:`classify` and :func:`proxy_status` when
first called, not with this module: the exception tree is also imported on the CLI's client
path (``fetchpool fetch``/``stats``, through fetchpool.config), which they made ~0.5 s slower to
start (``python -X importtime -c 'import fetchpool.cli'``: 590 ms, 190 ms without them).
"""

from __future__ import annotations

import ast
import enum
import os
import re
import socket
import ssl

__all__ = [
    "ConfigError",
    "ErrorKind",
    "FetchFailed",
    "FetchpoolError",
    "InvalidLimits",
    "classify",
    "proxy_status",
    "readable",
]


class ErrorKind(enum.IntEnum):
    """Why one fetch failed (``fetchpool.v1.FetchError.Kind``)."""

    INVALID_URL = 1
    INVALID_ARGUMENT = 2
    DNS = 3
    CONNECT = 4
    TLS = 5
    PROXY = 6
    PROXY_AUTH = 7
    TIMEOUT = 8
    POOL_TIMEOUT = 9
    TOO_LARGE = 10
    PROTOCOL = 11
    NETWORK = 12
    TOO_MANY_REDIRECTS = 13
    FORBIDDEN_TARGET = 14
    UNAVAILABLE = 15
    CANCELLED = 16
    INTERNAL = 17


class FetchpoolError(Exception):
    """Base of every error fetchpool raises itself."""


class ConfigError(FetchpoolError, ValueError):
    """A setting is missing, malformed or inconsistent. Raised at start-up.

    ``fields`` are (field name, problem) pairs when the settings at fault are known; a problem
    does not name its own field ("must be in 1..100000, got -1"), so that the CLI can name the
    flag or variable the value came from, and gRPC the request field.
    """

    def __init__(self, message: str, fields: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


class InvalidLimits(ConfigError):
    """Pool limits that are zero, negative, inconsistent or absurd (maps to INVALID_ARGUMENT)."""


class FetchFailed(FetchpoolError):
    """One fetch failed for a reason of ours (not a library exception)."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# What ssl raises when the connection ends in the middle of a handshake: a close, a reset, or a
# half-close that leaves the handshake waiting for bytes that never come.
_HANDSHAKE_CUT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError, ssl.SSLWantReadError,
                  ssl.SSLWantWriteError)


#: A peer's bytes quoted in an error message: this many at most.
QUOTED_BYTES = 80
# h11 quotes what it could not parse as a Python repr: "illegal status line: bytearray(b'...')".
_BYTES_REPR = re.compile(r"""bytearray\((b'(?:[^'\\]|\\.)*'|b"(?:[^"\\]|\\.)*")\)|\bb'(?:[^'\\]|\\.)*'""")


def _quoted(match: re.Match[str]) -> str:
    try:
        data = ast.literal_eval(match.group(1) or match.group(0))
    except (ValueError, SyntaxError):
        return match.group(0)
    shown = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x22 else f"\\x{b:02x}" for b in data[:QUOTED_BYTES])
    return f'"{shown}"' + (f" ... ({len(data)} bytes)" if len(data) > QUOTED_BYTES else "")


def readable(text: str) -> str:
    """``text`` with the Python reprs of bytes in it (``bytearray(b'...')``, ``b'...'``) shown as
    quoted text: printable ASCII as is, other bytes as ``\\xNN``, at most QUOTED_BYTES of them."""
    return _BYTES_REPR.sub(_quoted, text) if "b'" in text or 'b"' in text else text


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and its ``__cause__``/``__context__`` chain, bounded against cycles."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 16 and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _with_socket_error(text: str, chain: list[BaseException]) -> str:
    """``text`` and the socket's error from ``chain``, when it does not say it already: httpx's
    ReadError says nothing more, anyio's connect "All connection attempts failed"; the socket
    says "Connection reset by peer", "Connection refused"."""
    error = next((c for c in chain if isinstance(c, OSError) and (c.errno or c.strerror)), None)
    # The errno's own words: asyncio's connect says "Connect call failed ('10.0.0.1', 80)" for them.
    reason = "" if error is None else os.strerror(error.errno) if error.errno else str(error.strerror)
    return f"{text}: {reason}" if reason and reason not in text else text


def proxy_status(exc: BaseException) -> int | None:
    """The status a proxy gave to our CONNECT (httpcore's ProxyError says "<status> <reason>"), if any."""
    import httpcore
    import httpx
    for cause in _causes(exc):
        if isinstance(cause, httpx.ProxyError | httpcore.ProxyError):
            head = str(cause).split(" ", 1)[0]
            return int(head) if head.isdigit() else None
    return None


def classify(exc: BaseException, *, via_proxy: bool = False, connecting_to_proxy: bool = False) -> tuple[
    ErrorKind, str
]:
    """Map an exception raised while fetching to ``(kind, message)``.

    ``via_proxy`` says the request went through a forward proxy;
    ``connecting_to_proxy`` says the failure happened while the TCP connection
    to the proxy was being made (so a refused connect is the proxy's fault).
    The message never contains credentials: callers redact URLs before they
    can reach an exception text.
    """
    import h2.exceptions
    import httpcore
    import httpx
    import idna

    if isinstance(exc, FetchFailed):
        return exc.kind, str(exc)
    chain = _causes(exc)
    text = readable(str(exc) or type(exc).__name__)
    if isinstance(exc, httpx.ProxyError | httpcore.ProxyError):
        if text.startswith(("407", "401")):  # tinyproxy answers a bad Proxy-Authorization with 401
            return ErrorKind.PROXY_AUTH, f"proxy refused the credentials: {text}"
        return ErrorKind.PROXY, f"proxy refused the tunnel: {text}"
    if isinstance(exc, httpx.PoolTimeout | httpcore.PoolTimeout):
        return ErrorKind.POOL_TIMEOUT, "no pooled connection became available in time"
    if isinstance(exc, httpx.TimeoutException | httpcore.TimeoutException | TimeoutError):
        what = {httpx.ConnectTimeout: "connect", httpx.ReadTimeout: "read", httpx.WriteTimeout: "write"}.get(
            type(exc), "request"  # type: ignore[arg-type]
        )
        if connecting_to_proxy:
            return ErrorKind.PROXY, "timed out connecting to the proxy"
        return ErrorKind.TIMEOUT, f"{what} timed out"
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return ErrorKind.INVALID_URL, text
    if isinstance(exc, idna.IDNAError):  # httpx decodes an "xn--" host on first use, not when parsing
        return ErrorKind.INVALID_URL, f"invalid host name: {text}"
    if any(isinstance(c, _HANDSHAKE_CUT) for c in chain):
        # The peer (or a proxy in between) hung up mid-handshake: a connection failure,
        # not a certificate problem.
        if connecting_to_proxy or via_proxy:
            return ErrorKind.PROXY, "the connection through the proxy closed during the TLS handshake"
        return ErrorKind.CONNECT, "the connection closed during the TLS handshake"
    if any(isinstance(c, ssl.SSLError | ssl.CertificateError) for c in chain):
        reason = next(str(c) for c in chain if isinstance(c, ssl.SSLError | ssl.CertificateError))
        return ErrorKind.TLS, f"TLS failed: {reason}"
    if isinstance(exc, httpx.ConnectError | httpcore.ConnectError):
        if any(isinstance(c, socket.gaierror) for c in chain) or "Name or service not known" in text:
            if connecting_to_proxy:
                return ErrorKind.PROXY, f"proxy host did not resolve: {text}"
            return ErrorKind.DNS, f"host did not resolve: {text}"
        text = _with_socket_error(text, chain)
        if connecting_to_proxy:
            return ErrorKind.PROXY, f"could not connect to the proxy: {text}"
        return ErrorKind.CONNECT, f"could not connect: {text}"
    if "Receive buffer too long" in text:  # h11 refuses a header block over its 100 KiB buffer
        return ErrorKind.TOO_LARGE, "response headers exceed the HTTP/1.1 parser's limit"
    if isinstance(exc, httpx.RemoteProtocolError | httpcore.RemoteProtocolError) or any(
        isinstance(c, h2.exceptions.ProtocolError) for c in chain
    ):
        return ErrorKind.PROTOCOL, f"protocol error: {text}"
    if isinstance(exc, httpx.LocalProtocolError | httpcore.LocalProtocolError):
        return ErrorKind.INVALID_ARGUMENT, f"request cannot be sent: {text}"
    if isinstance(exc, httpx.DecodingError):
        return ErrorKind.PROTOCOL, f"response body could not be decoded: {text}"
    if isinstance(exc, httpx.TooManyRedirects):
        return ErrorKind.TOO_MANY_REDIRECTS, text
    if isinstance(exc, httpx.NetworkError | httpcore.NetworkError | ConnectionError):
        text = _with_socket_error(text, chain)
        if via_proxy and connecting_to_proxy:
            return ErrorKind.PROXY, f"proxy connection failed: {text}"
        return ErrorKind.NETWORK, f"connection failed: {text}"
    return ErrorKind.INTERNAL, f"{type(exc).__name__}: {text}"
