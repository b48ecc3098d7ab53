"""The curl transport reads a server's stream limit from libcurl's HTTP/2 trace (curl/streams.py);
the engine tests see it used (test_engine_streams: connections x streams in flight)."""

from __future__ import annotations

import asyncio

import pycurl
from fetchpool.engine.transports.curl.streams import LIBCURL_DEFAULT, StreamCap, stream_limit, trace_enabled


def test_the_trace_can_be_turned_on_in_the_bundled_libcurl() -> None:
    # Off, the transport would carry one request per connection for good: a pycurl whose wheel
    # no longer bundles libcurl, or a libcurl without curl_global_trace, must fail here.
    assert trace_enabled()


def test_only_the_settings_line_gives_a_limit() -> None:
    text = pycurl.INFOTYPE_TEXT
    assert stream_limit(text, b"[HTTP/2] [0] MAX_CONCURRENT_STREAMS: 4\n") == 4
    assert stream_limit(text, b"[HTTP/2] [0] MAX_CONCURRENT_STREAMS: 128\n") == 128
    assert stream_limit(text, b"[HTTP/2] [0] notify MAX_CONCURRENT_STREAMS: 4\n") is None
    assert stream_limit(text, b"[HTTP/2] [0] <- FRAME[SETTINGS, len=18]\n") is None
    assert stream_limit(pycurl.INFOTYPE_HEADER_IN, b"[HTTP/2] [0] MAX_CONCURRENT_STREAMS: 4\n") is None


async def test_the_cap_is_the_lowest_limit_seen_and_at_most_libcurls() -> None:
    changes: list[int] = []
    streams = StreamCap(lambda: changes.append(streams.cap))
    for line in (b"MAX_CONCURRENT_STREAMS: 128", b"MAX_CONCURRENT_STREAMS: 4", b"MAX_CONCURRENT_STREAMS: 8"):
        streams.debug(pycurl.INFOTYPE_TEXT, b"[HTTP/2] [0] " + line + b"\n")
        await asyncio.sleep(0)  # applied from the loop, outside libcurl's callback
    assert (streams.cap, changes) == (4, [LIBCURL_DEFAULT, 4])
