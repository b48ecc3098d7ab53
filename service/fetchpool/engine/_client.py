"""The pod's one ``httpx.AsyncClient``, trimmed on the hot path.

Besides ``engine/_httpcore`` (httpx's transport, httpcore, h2), the one module that reaches into
httpx's internals: it replaces ``AsyncClient._send_single_request`` and
``_send_handling_redirects``. The client checks, when made, that the methods replaced, the one
calling them and the redirect builder it calls are those of httpx 0.28.1
(``_httpcore/checks.verify_client``, on every transport).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import idna
from httpx._models import request_context

from fetchpool.engine._httpcore.checks import verify_client
from fetchpool.engine.routing import NoCookies


class PoolClient(httpx.AsyncClient):
    """The pod's one ``httpx.AsyncClient``, keeping no cookies (``NoCookies``), with httpx's
    ``_send_single_request`` trimmed of what it does for every response that fetchpool has no
    use for (py-spy, h2/2KB, share of the service's CPU):

    - the cookie jar's ``extract_cookies``: wrappers of the request and response for
      ``http.cookiejar`` (the URL made a string and parsed again, the headers copied) before a
      jar that keeps nothing (3.4 %); session cookies are kept apart, per fetch (``sessions.py``);
    - the arguments of its INFO log line, computed even with the log off: the HTTP version and,
      over HTTP/2, the reason phrase through an ``IntEnum`` lookup (1 %);
    - ``BoundAsyncStream``, one more async generator every body chunk passes through, whose only
      job is ``response.elapsed`` (which fetchpool does not read: its phases time the fetch).

    Its ``_send_handling_redirects`` sends one request and, for a redirect, builds the request
    it points to as ``response.next_request``; it never follows it (``follow_redirects`` is
    unused: the engine follows redirects itself, and counts and checks them). httpx's would
    also run event hooks (fetchpool has none), and it fails the whole fetch when a Location is
    no URL, although a fetch that does not follow redirects has its response. Here such a
    response has no ``next_request``, and the engine says why it cannot follow it. So has a
    Location with a scheme and no host (``http:///x``, ``http:/x``): httpx would send it to the
    request's host on the scheme's default port, a URL typed that way is refused (no host).

    The rest is httpx 0.28.1's as it is. Raises ConfigError when made under an httpx whose
    methods replaced here, the one calling them or the redirect builder differ
    (``checks.verify_client``).
    """

    def __init__(self, **kwargs: Any) -> None:
        verify_client()
        super().__init__(cookies=NoCookies(), **kwargs)
        self._timeouts = self.timeout.as_dict()

    def new_request(self, method: str, url: httpx.URL, headers: Sequence[tuple[str, str]], content: bytes | None,
                    extensions: dict[str, Any]) -> httpx.Request:
        """The request ``build_request`` would make for this client (its headers under
        ``headers``, its timeouts), for what the engine sends: an absolute URL parsed already, no
        query params, no cookies (session cookies are added per hop). ``extensions`` is taken
        over. About 11 µs per request where ``build_request`` takes 20 (measured, timeit): its
        merges copy the client's headers twice and it makes the timeout dict every time."""
        merged = self.headers  # httpx.Request copies it
        if headers:
            merged = httpx.Headers(merged)
            merged.update(headers)
        extensions["timeout"] = self._timeouts  # read, never changed, by the transports
        return httpx.Request(method, url, headers=merged, content=content, extensions=extensions)

    async def _send_single_request(self, request: httpx.Request) -> httpx.Response:
        transport = self._transport_for_url(request.url)
        if not isinstance(request.stream, httpx.AsyncByteStream):
            raise RuntimeError("Attempted to send an sync request with an AsyncClient instance.")
        with request_context(request=request):
            response = await transport.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.request = request
        response.default_encoding = self._default_encoding
        return response

    async def _send_handling_redirects(self, request: httpx.Request, follow_redirects: bool,
                                       history: list[httpx.Response]) -> httpx.Response:
        response = await self._send_single_request(request)
        if response.has_redirect_location:
            try:
                if not _no_host(response.headers["Location"]):
                    response.next_request = self._build_redirect_request(request, response)
            except (httpx.RemoteProtocolError, httpx.InvalidURL, idna.IDNAError):
                pass  # "Invalid URL in location header", or a host that is no IDNA name: see the docstring
            except BaseException:  # nothing else is raised there in httpx 0.28.1; never leak the stream
                await response.aclose()
                raise
        return response


def _no_host(location: str) -> bool:
    """Whether ``location`` is an absolute URL without a host. Raises httpx.InvalidURL."""
    url = httpx.URL(location)
    return bool(url.scheme) and not url.raw_host
