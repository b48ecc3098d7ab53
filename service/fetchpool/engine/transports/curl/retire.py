"""The curl transport's request limit per connection: ``max_requests_per_connection``, or the
one learned from an origin's GOAWAYs (``engine/_httpcore/limits.py``), the lower.

libcurl has no such limit, and no call that closes a given connection. ``FORBID_REUSE`` on a
transfer closes its connection when it ends, but only when it is the last transfer on it, and
set from the event loop it comes too late: on loopback libcurl often sends a request and reads
its whole response within one ``socket_action`` (set once the headers had arrived, nginx logged
6 and 7 requests on HTTP/1.1 connections limited to 5, and up to 42 on HTTP/2 ones).

Here libcurl's PREREQFUNCTION, called once a transfer has its connection and before its request
is sent, counts the requests started on each connection (known by its local address) and keeps
the transfers on it. A transfer given a connection that has started its ``limit`` is not sent:
the callback aborts it before anything is written, and it goes again (``CurlEngine._finished``):
the first one held back by a connection still in use at once, on a new connection of its own
(``FRESH_CONNECT``: it would otherwise wait behind the slowest response on the old one, which
libcurl keeps offering), the next ones once the transfers on that connection ended (by then the
new connection can take them). Then the connection, idle, is shut down
(``shutdown(2)`` on its socket): libcurl finds it dead the next time it looks for a connection
to reuse, and closes it. (An HTTP/1.1 connection whose transfer was aborted is closed by libcurl
itself.)

Learning: libcurl sends a request refused by a server's GOAWAY again itself, and the callback
then sees the transfer a second time, on another connection. When the last transfer is off a
connection that refused some, the count it accepted (started less sent again) is what the
origin's server allows (``RequestLimits.refused_after``: once two connections in a row ended at
the same count). Only requests sent while others were in flight on their HTTP/2 connection
count as refused: libcurl also sends again a request written on a connection the server had
just closed when idle (an HTTP/1.1 keep-alive close, an HTTP/2 idle timeout), which says nothing
of a request limit (two such races at the same count taught a limit of 1 for good: found by a
newcomer's try, reuse was gone for the pool's life). A request sent again after a reset counts
as accepted: the server answered it and the reset destroyed the answer on its way (libcurl reads
a GOAWAY, and sends again what it refused, before the close that comes after it; through squid
with curl nearly every connection that met a GOAWAY was then reset, so learning must not skip
those). A count a mislabel makes wrong (a destroyed request whose reset went unseen)
drops what was learned until two connections agree again: through squid, 3 runs in 100 of the
learning test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable

import pycurl

from fetchpool.engine._httpcore.limits import OriginKey, RequestLimits, remember
from fetchpool.engine.phases import REFUSED
from fetchpool.engine.transports.curl.exchange import Exchange
from fetchpool.engine.transports.curl.handover import reset_local
from fetchpool.engine.transports.curl.ledger import Ledger

Key = tuple[str, int]  # a connection's local address


class RequestLimit:
    """Requests started per connection, for one multi handle: at most ``limit`` (0: no limit)
    or the origin's learned limit, the lower. ``resend(exchanges)`` sends held-back transfers
    again (outside libcurl's callbacks); ``ledger`` has the multi handle's sockets."""

    __slots__ = ("_fds", "_learned", "_ledger", "_origins", "_refused", "_replaced", "_resend", "_resets",
                 "_running", "_sent_again", "_shut", "_started", "_waiting", "limit", "retired")

    def __init__(self, limit: int, resend: Callable[[list[Exchange]], None], ledger: Ledger) -> None:
        self.limit = limit
        self._resend = resend
        self._ledger = ledger
        self._learned = RequestLimits()
        self._origins: dict[Key, OriginKey] = {}  # the origin of each connection
        self._sent_again: dict[Key, int] = {}  # requests of each connection libcurl sent again elsewhere
        self._refused: dict[Key, int] = {}  # of those, the ones sent while others were in flight there
        self._shut: dict[Key, bool] = {}  # connections shut down here that libcurl may not have noticed yet
        self._resets: dict[Key, bool] = {}  # connections known reset (libcurl may still send on them)
        # Connections seen, by local address. A connection that closed before its limit stays
        # until a new one has its address (at most one entry per local port ever used).
        self._started: dict[Key, int] = {}
        self._running: dict[Key, set[Exchange]] = {}  # the transfers on each connection
        self._fds: dict[Key, int] = {}  # the socket of each connection
        self._waiting: dict[Key, list[Exchange]] = {}  # held back until the connection is retired
        self._replaced: set[Key] = set()  # connections at their limit a held-back request replaces
        self.retired = 0  # connections retired at their limit

    def prereq(self, ex: Exchange, local_ip: str, local_port: int) -> int:
        """PREREQFUNCTION's answer for ``ex``, given the connection from ``local_ip``:``local_port``
        (inside libcurl: nothing here calls pycurl)."""
        key = (local_ip, local_port)
        if ex.on is not None:  # libcurl sends it again itself: its connection refused it, or died
            self._sent_again_why(ex)
            self.ended(ex, later=True)
        if ex.opened or key not in self._origins:  # a new connection (an old one's address may be reused)
            if not ex.opened and key in self._shut:
                # Shut down here: the request fails to leave, and libcurl sends it again on
                # another connection (nothing reached the server: not a send).
                return pycurl.PREREQFUNC_OK
            for memory in (self._started, self._sent_again, self._refused, self._shut, self._resets):
                memory.pop(key, None)
            self._fds[key] = self._ledger.socket_of(key)
            url = ex.request.url
            remember(self._origins, key, (url.raw_scheme, url.raw_host, url.port or 0))  # type: ignore[arg-type]
        started = self._started.get(key, 0)
        limit = self._limit(key)
        if limit and started >= limit:
            ex.held_on = key
            return pycurl.PREREQFUNC_ABORT  # libcurl fails it with E_ABORTED_BY_CALLBACK: see held_back
        self._started[key] = started + 1
        running = self._running.setdefault(key, set())
        ex.busy = bool(running)
        running.add(ex)
        ex.on = key
        ex.sends += 1
        return pycurl.PREREQFUNC_OK

    def _sent_again_why(self, ex: Exchange) -> None:
        """libcurl sends ``ex`` again itself, off the connection it was on: say why
        (``ex.resent``). After a reset of that connection (the proxy's, handed over, or one the
        kernel showed) the answer was given and destroyed on its way (a relay's reset discards
        what it held): counted as accepted (see the module docstring). A send refused while
        others were in flight is a GOAWAY's; one alone on its connection met a close (an idle
        timeout, a keep-alive close): sent again only."""
        key = ex.on
        assert key is not None
        reset, ex.reset = ex.reset or ("seen on the connection's socket" if self.was_reset(key) else ""), ""
        if reset:
            ex.resent.append(f"NETWORK: Connection reset by peer ({reset}; libcurl sent the request again)")
            return
        self._sent_again[key] = self._sent_again.get(key, 0) + 1
        if ex.busy:
            self._refused[key] = self._refused.get(key, 0) + 1
            ex.resent.append(REFUSED)
        else:
            ex.resent.append("NETWORK: the reused connection closed before answering (libcurl sent the request again)")

    def mark_reset(self, key: Key, why: str) -> None:
        """The connection from local address ``key`` was reset (``why``): its transfers fail, or
        are sent again, as reset. A connection shut down here
        (``_retire``) and then closed by its server reads as reset too: not one."""
        if key in self._shut:
            return
        remember(self._resets, key, True)  # type: ignore[arg-type]
        for ex in self._running.get(key, ()):
            ex.reset = ex.reset or why

    def was_reset(self, key: Key) -> bool:
        """Whether the connection from local address ``key`` is known reset, or its socket, still
        open, says so (then remembered)."""
        if key in self._resets:
            return True
        fd = self._fds.get(key, -1)
        if fd >= 0 and key not in self._shut and reset_local(fd) == key:
            remember(self._resets, key, True)  # type: ignore[arg-type]
            return True
        return False

    def _limit(self, key: Key) -> int:
        learned = self._learned.limit(self._origins[key]) if key in self._origins else 0
        return min(self.limit, learned) if self.limit and learned else self.limit or learned

    def running(self, key: Key) -> frozenset[Exchange]:
        """The transfers sent on the connection whose local address is ``key``, not ended."""
        return frozenset(self._running.get(key, ()))

    @staticmethod
    def held_back(ex: Exchange, failed: pycurl.error | None) -> bool:
        """Whether ``ex`` failed only because :meth:`prereq` held it back (it goes again)."""
        return ex.held_on is not None and failed is not None and failed.args[:1] == (pycurl.E_ABORTED_BY_CALLBACK,)

    def wait(self, ex: Exchange) -> bool:
        """``ex`` was held back: whether it waits for the transfers on its connection to end
        (False: send it again now; ``ex.fresh`` when on a new connection, the connection being
        still in use, else this one is retired now)."""
        key, ex.held_on = ex.held_on, None
        assert key is not None
        if self._running.get(key):
            if key not in self._replaced:  # the first held back by it: on a new connection now
                self._replaced.add(key)
                ex.fresh = True
                return False
            self._waiting.setdefault(key, []).append(ex)
            return True
        limit = self._limit(key)
        if limit and self._started.get(key, 0) >= limit:
            self._retire(key)
        return False

    def ended(self, ex: Exchange, *, later: bool = False) -> list[Exchange]:
        """``ex`` is done (completed, failed or stopped), or libcurl moved it to another
        connection: the last one off a connection at its limit retires it, and the transfers
        held back by it go again: returned (``later``: inside libcurl, so sent from the event
        loop, soon, and none returned)."""
        key, ex.on = ex.on, None
        running = self._running.get(key) if key is not None else None
        if key is None or running is None:
            return []
        running.discard(ex)
        if running:
            return []
        del self._running[key]
        self._replaced.discard(key)
        started = self._started.get(key, 0)
        sent_again = self._sent_again.pop(key, 0)
        if self._refused.pop(key, 0) and key in self._origins:
            self._learned.refused_after(self._origins[key], started - sent_again)
        limit = self._limit(key)
        if limit and started >= limit:
            self._retire(key)
        waiting = self._waiting.pop(key, [])  # (also when a learned limit was dropped meanwhile)
        if later and waiting:
            asyncio.get_running_loop().call_soon(self._resend, waiting)
            return []
        return waiting

    def _retire(self, key: Key) -> None:
        """Shut the idle connection ``key`` (at its limit) down, unless libcurl closed it
        already (an HTTP/1.1 one, on the transfer held back)."""
        self._started.pop(key, None)
        self._origins.pop(key, None)
        self.retired += 1
        fd = self._fds.pop(key, -1)
        if fd < 0:
            return
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
            if sock.getsockname()[:2] == key:  # still its socket
                sock.shutdown(socket.SHUT_RDWR)
                remember(self._shut, key, True)  # type: ignore[arg-type]
                connection = self._ledger.get(fd)
                if connection is not None:
                    connection.retired = True  # counted here, not again when it is closed
