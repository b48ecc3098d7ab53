"""The first request to a cold https origin goes alone (see ``engine.py``'s module docstring):
libcurl assumes 100 streams on a new connection until the server's SETTINGS arrive, so a burst on
it would overshoot a smaller limit, and the first connection's trace gives that limit
(``streams.py``). For an origin that answers HTTP/1.1 only, the first response is so waited for
once per origin."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Any

_COLD: Any = object()


class ColdOrigins:
    """Which origins have had a first answer. Not thread-safe: one event loop."""

    __slots__ = ("_gates",)

    def __init__(self) -> None:
        self._gates: dict[Hashable, Any] = {}  # origin -> a future while its first request runs, None once warm

    async def wait(self, key: Hashable) -> Callable[[asyncio.Future[None]], None] | None:
        """Hold a request to origin ``key`` while its first request waits for its response.
        Returns, for the first request, the callback to run when its headers arrive or it fails;
        else None. A first request cancelled before its answer (by its caller or its deadline)
        taught nothing about the origin: one of those held becomes the first instead, else they
        would all go at once on a connection whose stream limit is not known yet. One that failed
        lets them all go (they would fail as it did, or get their own connections)."""
        while True:
            gate = self._gates.get(key, _COLD)
            if gate is None:
                return None
            if gate is _COLD:
                break
            if not await asyncio.shield(gate):  # True: its first request was cancelled, look again
                return None
        waiting = self._gates[key] = asyncio.get_running_loop().create_future()

        def opened(headers: asyncio.Future[None]) -> None:
            again = headers.cancelled()
            if self._gates.get(key) is waiting:
                if not again and headers.exception() is None:
                    self._gates[key] = None
                else:
                    del self._gates[key]
            if not waiting.done():
                waiting.set_result(again)

        return opened

    def clear(self) -> None:
        """Forget every origin (the pool was closed)."""
        self._gates.clear()
