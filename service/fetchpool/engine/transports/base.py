"""The seam between a pool and the HTTP engine under it: what :class:`~fetchpool.engine.pool.Pool`
needs from a transport, whatever library moves the bytes.

A pool is an httpx transport under the pod's one ``httpx.AsyncClient`` (the Router sends each
request to its pool's). Beside sending, the pool needs its transport to

- make the httpx transport for verified requests, and one for ``tls_insecure_skip_verify`` ones
  (connections of their own, never shared with verified requests);
- change its limits live (connections in total, idle connections kept, keep-alive expiry);
- count its connections: open, idle (no request on it), HTTP/2, as the OS would count sockets;
- close idle connections that expired, retired (max requests, max age), whose peer hung up, or
  that are surplus to the keep-alive limit, once a second (:meth:`PoolTransport.tend`);
- after each response, close it and retire its connection when due (:meth:`PoolTransport.release`);
- connect only to addresses the SSRF guard approved (direct pools);
- report per request, into the request's :class:`~fetchpool.engine.phases.PhaseRecorder`
  (extension :data:`RECORDER_EXTENSION`): pool wait, connect, proxy CONNECT, TLS, TTFB, reuse,
  and on the response the HTTP version (``http_version`` extension) and the peer (httpcore's
  ``network_stream`` extension: ``get_extra_info("server_addr")`` and ``"ssl_object"``).

Two transports implement it: ``httpcore`` (httpx's own, with fetchpool's connections and pool
under it: ``engine/_httpcore``) and ``curl`` (libcurl through pycurl: ``engine/transports/curl``).
What each reports and supports is tabled in the README ("Transports").
"""

from __future__ import annotations

import abc
import ssl
from collections.abc import Hashable
from dataclasses import dataclass

import httpx

from fetchpool.config import PoolLimits, PoolPolicy
from fetchpool.engine.guard import TargetGuard

#: Request extension carrying the fetch's PhaseRecorder (transports that time phases themselves
#: report into it; httpcore's transport reads the ``trace`` extension instead).
RECORDER_EXTENSION = "fetchpool.recorder"


@dataclass(frozen=True, kw_only=True, slots=True)
class TransportConfig:
    """What a pool's transport is made from.

    ``ssl_context`` and ``ca_bundle`` say the same trust (an engine that cannot take an
    ``ssl.SSLContext`` reads the PEM file); ``proxy_url`` may carry credentials; ``guard`` is
    set for direct pools only (proxied targets are checked before each request, the proxy's
    own address is the operator's choice); ``max_header_bytes`` bounds a response header block.
    """

    limits: PoolLimits
    policy: PoolPolicy
    ssl_context: ssl.SSLContext
    ca_bundle: str
    proxy_url: str | None = None
    guard: TargetGuard | None = None
    max_header_bytes: int = 65_536


@dataclass(frozen=True, slots=True)
class ConnectionCounts:
    """A transport's connections now: ``open`` sockets (to targets, or to the proxy), of which
    ``idle`` carry no request."""

    open: int
    idle: int

    @property
    def active(self) -> int:
        return self.open - self.idle


class PoolTransport(abc.ABC):
    """One pool's HTTP engine (see the module docstring). Not thread-safe: one event loop."""

    @abc.abstractmethod
    def for_request(self, insecure: bool) -> httpx.AsyncBaseTransport:
        """The httpx transport for verified requests, or for ``tls_insecure_skip_verify`` ones."""

    @abc.abstractmethod
    def apply_limits(self, limits: PoolLimits) -> None:
        """Apply ``limits`` live; requests in flight and open connections are not cut."""

    def requests_cap(self, limits: PoolLimits) -> int:
        """Requests in flight the pool admits at most under ``limits`` (``limits.requests_cap``;
        a transport that cannot keep a connection within the server's stream limit says less)."""
        return limits.requests_cap

    @abc.abstractmethod
    def counts(self) -> ConnectionCounts:
        """The connections open now."""

    @abc.abstractmethod
    def open_connections(self) -> dict[Hashable, str]:
        """Every open connection by a key that stays the same while it lives, with its HTTP
        version ("HTTP/1.1" or "HTTP/2"): the pool derives connection lifetimes from it."""

    @property
    @abc.abstractmethod
    def retired_total(self) -> int:
        """Connections this transport closed itself so far (retired, expired, surplus, orphans)."""

    @abc.abstractmethod
    async def release(self, response: httpx.Response) -> None:
        """Close ``response`` (its body read or not), then close its connection if it is
        retiring and now idle. Called once per response, shielded from cancellation, unless
        :meth:`needs_release` says it has nothing to do."""

    def needs_release(self, response: httpx.Response) -> bool:
        """Whether :meth:`release` has anything to do for ``response``: here, whether it is still
        open (closing it is all ``release`` does once the connection cannot be retiring)."""
        return not response.is_closed

    @abc.abstractmethod
    async def tend(self, now: float, max_connections: int) -> None:
        """Once a second: retire connections older than the policy's max age, close idle ones
        that expired, retired or whose peer closed, and idle ones beyond
        ``min(max_keepalive_connections, max_connections - active)``. ``now`` is monotonic seconds."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close every connection; requests still in flight fail."""
