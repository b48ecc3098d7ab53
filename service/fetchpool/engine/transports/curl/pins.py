"""The curl transport's side of the SSRF guard: the addresses a target may be reached at,
checked by the guard, given to libcurl as a ``CURLOPT_RESOLVE`` entry, so libcurl never resolves
a name itself (its open-socket callback then refuses any other address: ``engine.py``)."""

from __future__ import annotations

import socket
import time

import httpx

from fetchpool.engine.guard import VERDICT_TTL, TargetGuard

#: Verdicts kept at most (the cache is emptied when it would hold more).
_MAX_PINS = 10_000


class Pins:
    """The guard's verdicts per (host, port), each kept VERDICT_TTL seconds."""

    __slots__ = ("_guard", "_pins")

    def __init__(self, guard: TargetGuard) -> None:
        self._guard = guard
        self._pins: dict[tuple[str, int], tuple[float, frozenset[str], str]] = {}

    async def pin(self, host: str, port: int) -> tuple[frozenset[str], str]:
        """The addresses ``host`` may be reached at on ``port``, checked by the guard, and the
        ``CURLOPT_RESOLVE`` entry that gives libcurl exactly those ("" for an address literal).
        Raises FetchFailed(FORBIDDEN_TARGET), or httpx.ConnectError from a socket.gaierror."""
        now = time.monotonic()
        cached = self._pins.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        literal = host.strip("[]")
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in literal else socket.AF_INET, literal)
        except OSError:
            try:
                addresses = await self._guard.resolve(host, port)
            except socket.gaierror as exc:
                raise httpx.ConnectError(f"{host}: {exc.strerror or exc}") from exc
            entry = f"{host}:{port}:" + ",".join(f"[{a}]" if ":" in a else a for a in addresses)
        else:
            await self._guard.resolve(literal, port)  # raises FORBIDDEN_TARGET
            addresses, entry = [literal], ""
        if len(self._pins) >= _MAX_PINS:
            self._pins.clear()
        pinned = frozenset(addresses)
        self._pins[(host, port)] = (now + VERDICT_TTL, pinned, entry)
        return pinned, entry
