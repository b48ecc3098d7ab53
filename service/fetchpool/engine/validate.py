"""Checking a fetch before anything is sent: its URL, method, headers, timeout and options."""

from __future__ import annotations

import re

import httpx
import idna

from fetchpool.config import Timeouts
from fetchpool.engine.model import FetchSpec
from fetchpool.errors import ErrorKind, FetchFailed

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Field values are sent as ASCII by httpx: visible characters, spaces and tabs (RFC 9110 §5.5).
_BAD_VALUE = re.compile(r"[^\t\x20-\x7e]")
# Message framing and connection management belong to the client (RFC 9110 §7.6.1, RFC 9113 §8.2.2).
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection",
                      "upgrade", "te", "trailer"})
# httpx gives the host IDNA-encoded; what remains is a DNS name or IPv4 literal, or an IPv6
# literal (it has a colon) with an optional zone id.
_HOST = re.compile(rb"^(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9]+)?)$")


#: A DNS name's length at most (RFC 1035 §2.3.4, without the root's dot); an IP literal is shorter.
_MAX_HOST = 253
#: Characters of a bad host quoted in a message.
_QUOTED = 80


def _unclosed_ipv6(url: str) -> str | None:
    """What is wrong with ``url`` when its host opens an IPv6 literal and never closes it (httpx
    then reads the address's last colon as the port's: "Invalid port: ':1'"); None otherwise."""
    authority = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    host = authority.rpartition("@")[2]
    if host.startswith("[") and "]" not in host:
        return f"the IPv6 address {host!r} is not closed with ']'"
    return None


def url_problem(url: httpx.URL) -> str:
    """What makes ``url`` no fetch target (not an absolute http(s) URL with a valid host and
    port), in a sentence; "" when it is one. Applies to redirect targets too."""
    if url.scheme not in ("http", "https"):
        return f"unsupported scheme {url.scheme!r}: only http and https" if url.scheme else "URL is not absolute"
    try:
        host = url.host
    except idna.IDNAError as exc:  # httpx decodes an "xn--" name on first use, not when parsing
        return f"invalid host name: {exc}"
    if not host:
        return "URL has no host"
    if not _HOST.match(url.raw_host):
        return f"invalid host {host[:_QUOTED]!r}" + (f"... ({len(host)} characters)" if len(host) > _QUOTED else "")
    if len(url.raw_host) > _MAX_HOST:
        return f"host name of {len(url.raw_host)} characters: at most {_MAX_HOST} (RFC 1035)"
    if url.port is not None and not 0 < url.port < 65536:
        return f"port {url.port} is out of range"
    return ""


def location_problem(location: str) -> str:
    """Why a redirect's ``location`` cannot be followed, when the client built no request for it."""
    try:
        url = httpx.URL(location)
    except httpx.InvalidURL:
        return "not a URL"
    return (url_problem(url) if url.scheme else "") or "not a URL"


def check(spec: FetchSpec, timeouts: Timeouts) -> tuple[str, httpx.URL, float]:
    """``(method, URL, total timeout in seconds)`` of a valid spec.

    Raises FetchFailed with INVALID_URL (not an absolute http(s) URL with a valid host and port)
    or INVALID_ARGUMENT (method, header, timeout or option out of bounds).
    """
    try:
        url = httpx.URL(spec.url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise FetchFailed(ErrorKind.INVALID_URL, f"invalid URL: {_unclosed_ipv6(spec.url) or exc}") from None
    problem = url_problem(url)
    if problem:
        raise FetchFailed(ErrorKind.INVALID_URL, problem)
    method = (spec.method or "GET").upper()
    if not _TOKEN.match(method):
        raise FetchFailed(ErrorKind.INVALID_ARGUMENT, f"invalid method {spec.method!r}")
    for name, value in spec.headers:
        if not _TOKEN.match(name) or _BAD_VALUE.search(value):
            raise FetchFailed(ErrorKind.INVALID_ARGUMENT, f"invalid header {name!r}")
        if name.lower() in _FRAMING:
            raise FetchFailed(ErrorKind.INVALID_ARGUMENT, f"header {name!r} is set by fetchpool, not by callers")
    timeout = timeouts.request if spec.timeout is None else spec.timeout
    if not (0 < timeout <= timeouts.max_request):
        raise FetchFailed(
            ErrorKind.INVALID_ARGUMENT, f"timeout must be in (0, {timeouts.max_request:.0f}] seconds, got {timeout}"
        )
    if spec.max_body_bytes < 0:
        raise FetchFailed(ErrorKind.INVALID_ARGUMENT, "max_body_bytes must not be negative")
    if spec.keep_cookies and not spec.session_key:
        raise FetchFailed(ErrorKind.INVALID_ARGUMENT, "keep_cookies needs a session_key: cookies are kept per session")
    return method, url, timeout
