"""What a response tells about itself, read into an :class:`Outcome`: its peer, its header
limits, its status line and headers (the body is ``engine.body``'s)."""

from __future__ import annotations

import weakref
from typing import Any

import httpx

from fetchpool.config import FetchSettings
from fetchpool.engine._httpcore import stream_info
from fetchpool.engine.body import decodes
from fetchpool.engine.model import Outcome
from fetchpool.errors import ErrorKind, FetchFailed

#: Per network stream (one per connection): the peer's "ip:port" and the TLS version, which never
#: change for a connection. Reading them costs a ``get_extra_info`` each (anyio builds a dict of
#: every attribute per call): 2.6 % of the service's CPU when done per response (py-spy, h2/2KB).
_PEERS: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()


def describe_peer(response: httpx.Response, outcome: Outcome) -> None:
    """Set ``outcome.remote_address`` ("ip:port" of the target, or of the proxy) and
    ``outcome.tls_version`` (of the connection to the target; "" without TLS or when the
    transport does not tell) from the response's ``network_stream`` extension."""
    stream = response.extensions.get("network_stream")
    if stream is None:
        return
    # A stream that takes no weak reference is made per response (no connection to cache for).
    cacheable = hasattr(stream, "__weakref__")
    peer = _PEERS.get(stream) if cacheable else None
    if peer is None:
        remote = ""
        address = stream_info(stream, "server_addr")
        if isinstance(address, tuple) and len(address) >= 2:
            host = str(address[0])
            remote = f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
        ssl_object = stream_info(stream, "ssl_object")
        peer = (remote, (ssl_object.version() or "") if ssl_object is not None else "")
        if cacheable:
            _PEERS[stream] = peer
    remote, tls = peer
    if remote:
        outcome.remote_address = remote
    outcome.tls_version = tls


def check_headers(response: httpx.Response, fetch: FetchSettings) -> None:
    """Raise FetchFailed(TOO_LARGE) when the response has more header fields than
    ``fetch.max_header_count`` or more header bytes (names, values, 4 bytes of framing each) than
    ``fetch.max_header_bytes``."""
    raw = response.headers.raw
    size = sum(len(name) + len(value) + 4 for name, value in raw)
    if len(raw) > fetch.max_header_count or size > fetch.max_header_bytes:
        raise FetchFailed(
            ErrorKind.TOO_LARGE,
            f"response headers: {len(raw)} fields, {size} bytes; the limits are {fetch.max_header_count} "
            f"fields and {fetch.max_header_bytes} bytes",
        )


def describe_response(response: httpx.Response, outcome: Outcome) -> None:
    """Set the outcome's status code, HTTP version, headers (as received, latin-1), final URL
    and whether the body was decoded (``content_decoded``)."""
    outcome.status_code = response.status_code
    outcome.http_version = response.http_version
    outcome.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]
    outcome.final_url = str(response.url)
    outcome.content_decoded = decodes(response)
