"""Admission in front of a pool: a resizable FIFO limiter with a per-host cap.

httpcore queues requests inside the pool and rescans that queue on every
assignment, so its cost grows with the number of requests waiting in it; it
also has no per-host limit and no live resize. Requests therefore wait here,
in order, and enter the pool only when it has room for them (the split Envoy
makes between ``max_requests`` / ``max_pending_requests`` and the pool itself).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass


class AdmissionTimeout(Exception):
    """No slot became free within the timeout."""


@dataclass(slots=True)
class _Waiter:
    host: str
    future: asyncio.Future[None]


class Admission:
    """At most ``capacity`` holders at once, and at most ``per_host`` per host (0 = no cap).

    ``resize`` changes both live: growing admits waiters at once; shrinking
    lets current holders finish and admits nobody until the count is below the
    new capacity. Waiters are served first come, first served, except that a
    waiter whose host is at its cap lets later waiters for other hosts pass.
    """

    def __init__(self, capacity: int, per_host: int = 0) -> None:
        self._capacity = capacity
        self._per_host = per_host
        self._active = 0
        self._by_host: collections.Counter[str] = collections.Counter()
        self._waiters: collections.deque[_Waiter] = collections.deque()

    @property
    def active(self) -> int:
        """Slots held now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        return len(self._waiters)

    def hosts(self) -> list[str]:
        """The hosts holding slots now."""
        return list(self._by_host)

    def _fits(self, host: str) -> bool:
        return self._active < self._capacity and (self._per_host == 0 or self._by_host[host] < self._per_host)

    def _take(self, host: str) -> None:
        self._active += 1
        self._by_host[host] += 1

    async def acquire(self, host: str, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a slot for ``host``.

        Raises :class:`AdmissionTimeout`; on cancellation nothing is held.
        """
        # Every waiter is blocked (by capacity or by its host's cap) since the last
        # _wake(), so taking a slot that fits now passes nobody who could have had it.
        if self._fits(host):
            self._take(host)
            return
        waiter = _Waiter(host, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter.future
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                # Admitted just as we gave up: hand the slot back.
                self.release(host)
            elif waiter in self._waiters:  # _wake() drops cancelled waiters itself
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise AdmissionTimeout(f"no slot within {timeout:.3g} s") from None
            raise

    def release(self, host: str) -> None:
        """Give back a slot taken for ``host``."""
        self._active -= 1
        self._by_host[host] -= 1
        if not self._by_host[host]:
            del self._by_host[host]
        self._wake()

    def resize(self, capacity: int, per_host: int) -> None:
        """Change the limits now (see the class docstring)."""
        self._capacity = capacity
        self._per_host = per_host
        self._wake()

    def _wake(self) -> None:
        if not self._waiters or self._active >= self._capacity:
            return
        if self._per_host == 0:
            while self._waiters and self._active < self._capacity:
                waiter = self._waiters.popleft()
                if waiter.future.done():  # cancelled, its task has not run its cleanup yet
                    continue
                self._take(waiter.host)
                waiter.future.set_result(None)
            return
        kept: collections.deque[_Waiter] = collections.deque()
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.future.done():
                continue
            if self._active < self._capacity and self._fits(waiter.host):
                self._take(waiter.host)
                waiter.future.set_result(None)
            else:
                kept.append(waiter)
        self._waiters = kept
