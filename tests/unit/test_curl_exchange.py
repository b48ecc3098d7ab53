"""The curl transport's per-request state (curl/exchange.py), fed by hand as libcurl would."""

from __future__ import annotations

import asyncio

import httpx
import pycurl
from fetchpool.engine.transports.curl.exchange import Exchange


async def test_headers_that_arrive_after_the_caller_cancelled_raise_nothing_inside_libcurl() -> None:
    # The request's task was cancelled (which cancels the future it awaits) and is about to stop
    # the transfer, when libcurl delivers the headers: a callback that raised would make pycurl
    # print a traceback and libcurl fail the transfer with a write error.
    easy = pycurl.Curl()
    try:
        ex = Exchange(easy, httpx.Request("GET", "https://a.example/"), asyncio.get_running_loop(), tunnel=False,
                      addresses=None, max_header_bytes=65536, release=lambda ex: None)
        ex.headers_ready.cancel()
        for line in (b"HTTP/2 200\r\n", b"content-type: text/html\r\n", b"\r\n"):
            assert ex.on_header(line) is None
        assert ex.ready and ex.headers == [(b"content-type", b"text/html")]
    finally:
        easy.close()
