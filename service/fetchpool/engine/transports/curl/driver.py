"""libcurl's multi-socket API on the running asyncio loop: the curl transport's driver.

pycurl ships one (``pycurl.AsyncCurlMulti``, 7.49); this one does the same job with less per
transfer, which the service pays on every fetch. Measured on the service (h2/2KB, FetchMany of
5,000 URLs, C=100, counted and py-spy'd): per transfer, ``AsyncCurlMulti`` makes an
``asyncio.Future`` with two done-callbacks (each a trip through the loop's ready queue), a
completion notice that is one more loop trip (0.66 per transfer), a running-loop look-up, and
2.6 timer updates, each a cancelled handle and a new one; its callbacks held 12.2 % of the
service's samples (libcurl's own work inside them included), this driver's 11.3 %. Here a
completion is handed to ``on_done`` as soon as the ``socket_action`` that finished it returns,
and libcurl's timer is one handle, moved only when libcurl wants it earlier (one that fires early
is re-armed; one libcurl no longer wants does nothing when it fires). There is also no stale
done-callback to guard against: AsyncCurlMulti looks a finished transfer up by its easy handle
alone, so reusing the handle before its callbacks ran could drop the next transfer.

Not thread-safe: everything runs on the loop that made the :class:`Multi`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pycurl

from fetchpool.engine.transports.curl.handover import TunnelEnds, Tunnels

_IN, _OUT = pycurl.POLL_IN, pycurl.POLL_OUT
#: A timer due within this many seconds of now runs now (the loop's clock has ms resolution).
_SLACK = 0.001


class Multi:
    """One libcurl multi handle driven by the running loop. ``on_done(easy, error)`` is called
    once per transfer libcurl completes (``error`` None) or fails (a ``pycurl.error``); a transfer
    taken back with :meth:`remove` gets no call; ``on_remove(fd)`` when libcurl stops watching
    socket ``fd``, still open (it is about to close it, or leaves it idle). Make it inside the
    running loop.

    ``tunnels``, given for a proxy's connections (``handover.Tunnels``): a proxy resets the
    tunnel when a write of ours reaches it after the server closed, and libcurl then drops the
    connection with answers unread in it. So before each call into libcurl a socket whose proxy
    has ended it is handed over (``handover.py``); and before libcurl's timer runs (where it
    starts new transfers on open connections), every socket with input is acted on first. Costs
    two ``poll`` calls per timer run, one per socket event.
    """

    def __init__(self, on_done: Callable[[pycurl.Curl, pycurl.error | None], None], *,
                 on_remove: Callable[[int], None] | None = None, tunnels: Tunnels | None = None) -> None:
        self.loop = asyncio.get_running_loop()  # the loop it runs on
        self._on_done = on_done
        self._on_remove = on_remove
        self._multi = pycurl.CurlMulti()
        self._easies: set[pycurl.Curl] = set()
        self._watched: dict[int, int] = {}  # fd -> the POLL_IN / POLL_OUT bits the loop watches
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0  # loop time the scheduled handle fires at
        self._due: float | None = None  # loop time libcurl wants its timeout run by (None: not wanted)
        self._ends = TunnelEnds(self.loop, self._swap, tunnels) if tunnels is not None else None
        self.closed = False
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)

    def setopt(self, option: int, value: Any) -> None:
        """A ``CURLMOPT_*`` option (not the socket or timer function: they are this driver's)."""
        self._multi.setopt(option, value)

    def add(self, easy: pycurl.Curl) -> None:
        """Start ``easy``'s transfer. Raises pycurl.error when libcurl refuses it."""
        self._multi.add_handle(easy)
        self._easies.add(easy)

    def remove(self, easy: pycurl.Curl) -> None:
        """Stop ``easy``'s transfer now, if it is still running; ``on_done`` is not called for it."""
        if easy in self._easies:
            self._easies.discard(easy)
            self._multi.remove_handle(easy)

    def close(self) -> None:
        """Stop every transfer (no ``on_done`` for them) and close every connection."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for easy in list(self._easies):
            with contextlib.suppress(pycurl.error):
                self._multi.remove_handle(easy)
        self._easies.clear()
        self._multi.close()  # libcurl closes its connections (POLL_REMOVE for each socket)
        for fd in list(self._watched):  # any socket libcurl did not report removed
            self._watch(fd, 0)
        if self._ends is not None:
            self._ends.close()

    # -- libcurl's callbacks (inside socket_action, add_handle, remove_handle, pause) --

    def _on_socket(self, what: int, fd: int, multi: Any, socketp: Any) -> None:
        if what == pycurl.POLL_REMOVE and self._on_remove is not None:
            self._on_remove(fd)  # before libcurl closes it
        self._watch(fd, 0 if what == pycurl.POLL_REMOVE or self.closed else what & (_IN | _OUT))

    def _watch(self, fd: int, wanted: int) -> None:
        loop = self.loop
        watched = self._watched.get(fd, 0)
        if self._ends is not None and bool(wanted) != bool(watched):
            (self._ends.track if wanted else self._ends.untrack)(fd)
        if wanted & _IN and not watched & _IN:
            loop.add_reader(fd, self._act, fd, pycurl.CSELECT_IN)
        elif watched & _IN and not wanted & _IN:
            loop.remove_reader(fd)
        if wanted & _OUT and not watched & _OUT:
            loop.add_writer(fd, self._act, fd, pycurl.CSELECT_OUT)
        elif watched & _OUT and not wanted & _OUT:
            loop.remove_writer(fd)
        if wanted:
            self._watched[fd] = wanted
        else:
            self._watched.pop(fd, None)

    def _on_timer(self, timeout_ms: int) -> None:
        if timeout_ms < 0:
            self._due = None  # a handle still scheduled finds nothing due
            return
        loop = self.loop
        due = self._due = loop.time() + timeout_ms / 1000
        if self._timer is not None:
            if self._timer_at <= due:
                return  # it fires first, and is re-armed then
            self._timer.cancel()
        self._timer_at = due
        # call_soon for 0: libcurl must not be called again from inside its own callback.
        self._timer = loop.call_soon(self._expire) if timeout_ms == 0 else loop.call_at(due, self._expire)

    # -- in the loop --

    def _expire(self) -> None:
        self._timer = None
        due = self._due
        if due is None or self.closed:
            return
        if due > self.loop.time() + _SLACK:
            self._timer_at = due
            self._timer = self.loop.call_at(due, self._expire)
            return
        self._due = None  # consumed: libcurl sets the next one from inside socket_action
        if self._ends is not None:
            for fd in self._ends.readable():
                if self._watched.get(fd, 0) & _IN:  # still libcurl's after the reads before it
                    self._act(fd, pycurl.CSELECT_IN)
        self._act(pycurl.SOCKET_TIMEOUT, 0)

    def _act(self, fd: int, mask: int) -> None:
        if self.closed:
            return
        self.hand_over_closed()
        try:
            self._multi.socket_action(fd, mask)
        except pycurl.error as exc:  # the multi handle itself failed: so does every transfer
            for easy in list(self._easies):
                self._finish(easy, exc)
            return
        while True:
            queued, ok, failed = self._multi.info_read()
            for easy in ok:
                self._finish(easy, None)
            # A transfer that read a reset first: the engine marks its connection's other
            # transfers, which libcurl fails as cut short, as reset too (CurlEngine._finished).
            for easy, code, message in sorted(failed, key=lambda f: "reset" not in str(f[2]).lower()):
                self._finish(easy, pycurl.error(code, message))
            if not queued:
                return

    def hand_over_closed(self) -> None:
        """Hand over the sockets a proxy ended (given ``tunnels``; see the class docstring).
        Also called from inside libcurl where it is about to write (it makes no pycurl call)."""
        if self._ends is not None:
            self._ends.hand_over_closed()

    def _swap(self, fd: int, make: Callable[[], None]) -> None:
        wanted = self._watched.get(fd, 0)
        self._watch(fd, 0)  # the loop's registration is for the file that goes
        make()
        self._watch(fd, wanted)

    def _finish(self, easy: pycurl.Curl, error: pycurl.error | None) -> None:
        if easy not in self._easies:
            return
        self._easies.discard(easy)
        with contextlib.suppress(pycurl.error):
            self._multi.remove_handle(easy)
        self._on_done(easy, error)
