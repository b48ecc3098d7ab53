"""Per-origin request rate (politeness towards targets)."""

from __future__ import annotations

import asyncio
import time


class HostRate:
    """At most ``rate`` requests per second per origin, spaced evenly (GCRA, burst 1).

    :meth:`wait` returns when the request may go; ``prune`` forgets idle origins.
    """

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next: dict[str, float] = {}

    async def wait(self, origin: str) -> None:
        """Sleep until ``origin`` may receive the next request (cancellation-safe)."""
        now = time.monotonic()
        at = max(now, self._next.get(origin, now))
        self._next[origin] = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)

    def prune(self) -> None:
        """Drop origins whose next slot is in the past (bounded memory)."""
        now = time.monotonic()
        for origin in [o for o, at in self._next.items() if at < now]:
            del self._next[origin]
