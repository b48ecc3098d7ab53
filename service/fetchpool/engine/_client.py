"""The pod's one ``httpx.AsyncClient``, trimmed on the hot path.

Besides ``engine/_httpcore`` (httpx's transport, httpcore, h2), the one module that reaches into
httpx's internals: it replaces ``AsyncClient._send_single_request``. The client checks, when
made, that the method replaced and the one calling it are those of httpx 0.28.1
(``_httpcore/checks.verify_client``, on every transport).
"""

from __future__ import annotations

from typing import Any

import httpx
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

    The rest is httpx 0.28.1's as it is. Raises ConfigError when made under an httpx whose
    method replaced here, or the one calling it, differs (``checks.verify_client``).
    """

    def __init__(self, **kwargs: Any) -> None:
        verify_client()
        super().__init__(cookies=NoCookies(), **kwargs)

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
