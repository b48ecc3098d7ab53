"""What libcurl says about a transfer, turned into fetchpool's phases and httpx's exceptions.

libcurl times every transfer from its start (``*_TIME_T``, microseconds): the queue (pool wait:
waiting for a connection under the caps, or for a multiplexed one), name lookup, TCP connect,
TLS (``APPCONNECT``), request sent (``PRETRANSFER``), first response byte (``STARTTRANSFER``).
It has no figure for a proxy's CONNECT: its end is when the proxy's answer arrives (timed by the
header callback, ``Exchange.t_tunnel``). A SOCKS5 handshake is inside ``connect``.
"""

from __future__ import annotations

import os
import socket
import ssl

import httpx
import pycurl

from fetchpool.engine.guard import refusal
from fetchpool.engine.phases import Phase
from fetchpool.engine.transports.curl.exchange import Exchange
from fetchpool.errors import ErrorKind, FetchFailed

HTTP_VERSIONS = {
    pycurl.CURL_HTTP_VERSION_1_0: b"HTTP/1.0",
    pycurl.CURL_HTTP_VERSION_1_1: b"HTTP/1.1",
    pycurl.CURL_HTTP_VERSION_2_0: b"HTTP/2",
}
_US = 1e-6
_E_PROXY = 97
_E_HTTP2_STREAM = 92
_E_TOO_LARGE = 100
# Failures that end a TLS handshake because the peer went away, not because of a certificate.
_CUT = ("unexpected eof", "connection reset", "ssl_error_syscall", "connection was reset", "broken pipe")


def report(ex: Exchange, failed: pycurl.error | None = None) -> None:
    """Read the transfer's facts once (at its response headers, or when it failed before them)
    into its PhaseRecorder, and learn which socket it used."""
    if ex.reported:
        return
    ex.reported = True
    g = ex.easy.getinfo
    active = g(pycurl.ACTIVESOCKET)
    if active >= 0:
        ex.fd = active
    recorder = ex.recorder
    if recorder is None:
        return
    t0 = ex.t0
    queued = t0 + g(pycurl.QUEUE_TIME_T) * _US
    connect_end = g(pycurl.CONNECT_TIME_T) * _US
    tls_end = g(pycurl.APPCONNECT_TIME_T) * _US
    sent = g(pycurl.PRETRANSFER_TIME_T) * _US
    first = g(pycurl.STARTTRANSFER_TIME_T) * _US
    step = _failed_step(ex, failed, connect_end, tls_end) if failed is not None else ""
    phases: list[Phase] = []
    if ex.opened:
        phases.append(Phase("connect", queued, t0 + connect_end if connect_end else queued))
        # A CONNECT that failed ends when the transfer did.
        tunnel_end = ex.t_tunnel or (t0 + g(pycurl.TOTAL_TIME_T) * _US if step == "proxy.connect" else 0.0)
        if ex.tunnel and (tunnel_end or step == "proxy.connect"):
            phases.append(Phase("proxy.connect", t0 + connect_end, tunnel_end or t0 + connect_end))
        if tls_end or step == "tls":
            start = max(tunnel_end, t0 + connect_end)
            alpn = "h2" if ex.version == b"HTTP/2" else "http/1.1"
            phases.append(Phase("tls", start, max(start, t0 + tls_end), {"tls.alpn": alpn}))
    if sent:
        phases.append(Phase("request.send", t0 + sent, t0 + sent))
        phases.append(Phase("response.headers", t0 + sent, t0 + max(first, sent)))
    for phase in phases:
        if phase.name == step:
            phase.failed = True
    # libcurl sends a request again itself when a server's GOAWAY refused it or a reused
    # connection died unanswered (retire.py counts the sends and says why).
    recorder.timed(queued, phases, connected=ex.opened > 0, responded=ex.headers_ready.done() and failed is None,
                   http2=ex.version == b"HTTP/2", sends=max(1, ex.sends), resent=ex.resent)


def _failed_step(ex: Exchange, failed: pycurl.error, connect_end: float, tls_end: float) -> str:
    code = failed.args[0] if failed.args else 0
    if not ex.opened:
        return ""
    if code == _E_PROXY or (ex.tunnel and connect_end and not ex.t_tunnel and not tls_end):
        return "proxy.connect" if connect_end else "connect"
    if not connect_end:
        return "connect"
    if code in (pycurl.E_SSL_CONNECT_ERROR, pycurl.E_PEER_FAILED_VERIFICATION) or (
            ex.request.url.scheme == "https" and not tls_end):
        return "tls"
    return ""


def to_exception(failed: pycurl.error, ex: Exchange) -> BaseException:
    """The httpx exception (or fetchpool's) a failed transfer raises, as ``errors.classify``
    reads httpcore's: DNS failures carry a ``socket.gaierror``, certificate failures an
    ``ssl.SSLCertVerificationError``, a handshake cut short an ``ssl.SSLEOFError``. When its
    connection was reset (``ex.reset``: handed over after the proxy reset it, ``handover.py``, where
    libcurl read an end of the stream; or another stream read it), the reset is reported."""
    if ex.error is not None:
        return ex.error  # ours: a header block over the limit
    code, message = (*failed.args, 0, "")[:2]
    text = f"{message} (curl error {code})"
    request = ex.request
    if ex.refused:
        return FetchFailed(ErrorKind.FORBIDDEN_TARGET, refusal(request.url.host, ex.refused))
    g = ex.easy.getinfo
    status = g(pycurl.HTTP_CONNECTCODE)  # the proxy's answer to CONNECT (0: none)
    if code == _E_PROXY or status >= 300:
        return httpx.ProxyError(f"{status} {text}" if status else text, request=request)
    if code == pycurl.E_OPERATION_TIMEDOUT:
        # A transfer on a reused connection reports no connect time, as one whose connect never
        # finished does; it opened no socket of its own but has a connection (CONN_ID).
        connected = g(pycurl.CONNECT_TIME_T) > 0 or (not ex.opened and g(pycurl.CONN_ID) >= 0)
        return (httpx.ReadTimeout if connected else httpx.ConnectTimeout)(text, request=request)
    if code in (pycurl.E_COULDNT_RESOLVE_HOST, pycurl.E_COULDNT_RESOLVE_PROXY):
        return _caused(httpx.ConnectError(text, request=request), socket.gaierror(socket.EAI_NONAME, text))
    if code == pycurl.E_COULDNT_CONNECT:
        errno = g(pycurl.OS_ERRNO)  # the socket's error ("Connection refused"), which the text lacks
        error = httpx.ConnectError(text, request=request)
        return _caused(error, OSError(errno, os.strerror(errno))) if errno else error
    if code == pycurl.E_PEER_FAILED_VERIFICATION:
        return _caused(httpx.ConnectError(text, request=request), ssl.SSLCertVerificationError(text))
    if code == pycurl.E_SSL_CONNECT_ERROR:
        cause = ssl.SSLEOFError(text) if any(cut in message.lower() for cut in _CUT) else ssl.SSLError(text)
        return _caused(httpx.ConnectError(text, request=request), cause)
    if code == _E_TOO_LARGE:
        return FetchFailed(ErrorKind.TOO_LARGE, f"response too large for libcurl: {text}")
    read = read_reset(failed)
    if ex.reset and not read:  # (one that read it says so)
        return httpx.ReadError(f"Connection reset by peer ({ex.reset}; {text})", request=request)
    if code == pycurl.E_SEND_ERROR:
        return httpx.WriteError(text, request=request)
    if read:
        return httpx.ReadError(text, request=request)  # RST (a FIN is a protocol error, as with h11)
    # Empty reply, a short body, a malformed response, an HTTP/2 stream or connection error.
    return httpx.RemoteProtocolError(text, request=request)


def read_reset(failed: pycurl.error) -> bool:
    """Whether libcurl failed the transfer because it read a reset (RST) on its connection."""
    code, message = (*failed.args, 0, "")[:2]
    return code == pycurl.E_RECV_ERROR and "reset" in str(message).lower()


def cut_short(failed: pycurl.error) -> bool:
    """Whether libcurl failed the transfer as its connection cut short: an end of the stream, or
    an error OpenSSL gives without its cause ("SSL_ERROR_SYSCALL, errno 0"), a reset among them."""
    message = str((*failed.args, 0, "")[1]).lower()
    return any(cut in message for cut in _CUT)


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc
