"""Requests per connection that servers allow, learned per origin from their GOAWAYs.

A server that ends every HTTP/2 connection after N requests (nginx's ``keepalive_requests``,
1000 by default; Envoy's and h2o's own request limits) says GOAWAY when the N-th arrives, while
more requests of ours may already be on their way. Directly and through squid those come back
unprocessed and go to another connection. Through relays that reset a tunnel when bytes of ours
arrive after the server closed it (tinyproxy and microsocks close their side as soon as they read
the server's end), such a late request also destroys answers the relay had not passed on yet.

So once two connections to an origin in a row ended at the same count with requests refused,
that count is taken as the origin's limit, and its connections take no more requests than that:
the server's GOAWAY then meets no request of ours. A graceful shutdown's GOAWAY (a server
restarting) ends connections at counts that differ; one that differs from a learned limit drops it.
A server that raises its limit later is not noticed (connections keep retiring at the old one,
as often as before the limit was learned).

:func:`remember` bounds every per-origin memory of a pool (this one, the protocol negotiated, the
stream limit).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TypeAlias, TypeVar

V = TypeVar("V")

#: An origin as a dictionary key (httpcore's ``Origin`` is not hashable): (scheme, host, port).
OriginKey: TypeAlias = tuple[bytes, bytes, int]
#: Most origins a pool remembers anything about (a protocol, a stream or request limit).
MEMORY = 10_000


class RequestLimits:
    """What the servers of one pool's origins said about their request limits."""

    __slots__ = ("_last", "_learned")

    def __init__(self) -> None:
        self._last: dict[OriginKey, int] = {}  # the count of the origin's last refusing GOAWAY
        self._learned: dict[OriginKey, int] = {}

    def refused_after(self, key: OriginKey, accepted: int) -> None:
        """A graceful GOAWAY of ``key``'s server accepted ``accepted`` requests (streams) on a
        connection and refused later ones."""
        if accepted < 1:
            return
        if self._last.get(key) == accepted:
            remember(self._learned, key, accepted)
        else:
            self._learned.pop(key, None)
        remember(self._last, key, accepted)

    def limit(self, key: OriginKey) -> int:
        """Requests a connection to ``key`` should take at most; 0 when none was learned."""
        return self._learned.get(key, 0)


def remember(memory: MutableMapping[OriginKey, V], key: OriginKey, value: V) -> None:
    """``memory[key] = value``, forgetting the oldest origin first when ``memory`` is full."""
    if key not in memory and len(memory) >= MEMORY:
        memory.pop(next(iter(memory)))  # the oldest
    memory[key] = value
