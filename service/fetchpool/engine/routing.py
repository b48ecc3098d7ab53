"""The pod's one ``httpx.AsyncClient`` and the transport that routes each request to its pool."""

from __future__ import annotations

import http.cookiejar
from collections.abc import Mapping
from typing import Any

import httpx

from fetchpool.engine.pool import Pool

#: Request extensions read by :class:`Router`: the pool, and whether to skip TLS verification.
POOL_EXTENSION = "fetchpool.pool"
INSECURE_EXTENSION = "fetchpool.insecure"


class NoCookies(http.cookiejar.CookieJar):
    """The client is shared by every caller: never keep one caller's cookies for another."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None


class Router(httpx.AsyncBaseTransport):
    """Sends each request to the transport of the pool named in its extensions.

    This is how one ``AsyncClient`` keeps one pool per proxy: httpx picks
    proxies by URL pattern only, not per request.
    """

    def __init__(self, pools: Mapping[str, Pool]) -> None:
        self._pools = pools

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pool = self._pools[request.extensions[POOL_EXTENSION]]
        transport = pool.transport_for(request.extensions.get(INSECURE_EXTENSION, False))
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
