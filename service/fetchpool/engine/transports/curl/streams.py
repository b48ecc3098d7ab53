"""How many HTTP/2 streams an origin's server takes at once, for the curl transport's cap on
requests in flight.

libcurl assumes 100 streams on a new connection until the server's SETTINGS arrive, so a pool
with more requests in flight than connections overshoots a smaller server limit on each new
connection (the excess is refused and sent again). ``CURLMOPT_MAX_CONCURRENT_STREAMS``, its
client-side cap per connection, is applied when libcurl picks a connection, before SETTINGS too:
given the servers' limit, the pool can carry connections x streams requests (checked by hand:
``test_a_full_http2_connection_sends_the_next_request_to_another_connection`` passed on its
three routes with the cap set to its server's 4).

libcurl has no call that gives a peer's SETTINGS, but its HTTP/2 trace prints them:
``curl_global_trace("http/2")`` (libcurl 8.3+; pycurl 7.49 does not wrap it, so it is called
on the libcurl pycurl's wheel bundles) makes a transfer with ``VERBOSE`` pass
``[HTTP/2] [0] MAX_CONCURRENT_STREAMS: N`` to its ``DEBUGFUNCTION``. Only the first request to
a cold origin is traced (it opens the origin's first connection; about 70 lines for it).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import re
from collections.abc import Callable

import pycurl

from fetchpool.engine.transports.curl.bundled import bundled

_SETTING = re.compile(rb"\[HTTP/2\] \[0\] MAX_CONCURRENT_STREAMS: (\d+)")
#: libcurl's own cap, and what a server that sets none allows here.
LIBCURL_DEFAULT = 100


@functools.cache
def trace_enabled() -> bool:
    """Turn libcurl's HTTP/2 trace on for transfers with ``VERBOSE`` (once per process); False
    when pycurl's bundled libcurl is not found or has no ``curl_global_trace``."""
    # Not a libcurl of the system: it might not be the one pycurl loaded.
    global_trace = getattr(bundled("libcurl"), "curl_global_trace", None)
    if global_trace is None:
        return False
    global_trace.argtypes = [ctypes.c_char_p]
    global_trace.restype = ctypes.c_int
    return global_trace(b"http/2") == 0


def stream_limit(kind: int, text: bytes) -> int | None:
    """The server's SETTINGS_MAX_CONCURRENT_STREAMS in a ``DEBUGFUNCTION`` call's text, if it
    is that line (``kind`` 0: libcurl's informational text)."""
    if kind != pycurl.INFOTYPE_TEXT or b"MAX_CONCURRENT" not in text:
        return None
    match = _SETTING.search(text)
    return int(match.group(1)) if match else None


class StreamCap:
    """Streams per connection for one multi handle: the lowest limit its servers gave, at most
    libcurl's own 100 (``cap``; 0: none known yet). ``changed()`` is called (from the event loop)
    when it falls; ``debug`` is the easy handles' DEBUGFUNCTION."""

    __slots__ = ("_changed", "cap")

    def __init__(self, changed: Callable[[], None]) -> None:
        self.cap = 0
        self._changed = changed

    def debug(self, kind: int, text: bytes) -> None:
        """DEBUGFUNCTION (inside libcurl, for a traced transfer): nothing here calls pycurl."""
        limit = stream_limit(kind, text)
        if limit is not None:
            asyncio.get_running_loop().call_soon(self._learn, limit)

    def _learn(self, limit: int) -> None:
        cap = max(1, min(limit, LIBCURL_DEFAULT))
        if not self.cap or cap < self.cap:
            self.cap = cap
            self._changed()
