"""Forward proxies: parsing, redaction, and the choice of a pool per request."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from fetchpool.errors import ConfigError
from fetchpool.redact import redact_url

DIRECT = "direct"
SCHEMES = ("http", "https", "socks5", "socks5h")


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """One forward proxy. ``key`` is its URL with credentials redacted (safe to log and export)."""

    key: str
    url: str = field(repr=False)


def parse_proxy(url: str) -> ProxyConfig:
    """Check one proxy URL. Raises ConfigError (without echoing credentials) for a bad one."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise ConfigError(f"proxy URL {redact_url(url)!r} is malformed") from None
    if parsed.scheme not in SCHEMES:
        raise ConfigError(f"proxy URL {redact_url(url)!r}: scheme {parsed.scheme!r} is not one of {', '.join(SCHEMES)}")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ConfigError(f"proxy URL {redact_url(url)!r}: port {parsed.port} is out of range")
    if not parsed.host or (parsed.port is None and parsed.scheme.startswith("socks")):
        raise ConfigError(f"proxy URL {redact_url(url)!r} needs a host and a port")
    if parsed.userinfo and (not parsed.username or ":" not in parsed.userinfo.decode("ascii", "replace")):
        raise ConfigError(f"proxy URL {redact_url(url)!r}: credentials must be user:password")
    if parsed.path not in ("", "/") or parsed.query:
        raise ConfigError(f"proxy URL {redact_url(url)!r} must not have a path or query")
    return ProxyConfig(key=redact_url(str(parsed.copy_with(path=""))).rstrip("/"), url=url)


class Candidate(Protocol):
    """What a selector needs to know of a pool."""

    @property
    def name(self) -> str: ...

    @property
    def load(self) -> int: ...

    @property
    def available(self) -> bool: ...


class Selector:
    """Picks a pool per request: ``round_robin``, ``least_busy`` (fewest in flight + waiting)
    or ``sticky`` (the same session key keeps the same pool while it is available; keys
    are spread by a stable hash, so every process agrees). Ejected pools are skipped;
    when all are ejected the least recently ejected is used (never fail for want of a proxy)."""

    def __init__(self, policy: str, pools: Sequence[Candidate]) -> None:
        self._policy = policy
        self._pools = list(pools)
        self._cycle = itertools.cycle(range(len(self._pools)))

    def pick(self, session_key: str = "", avoid: Candidate | None = None) -> Candidate:
        """The pool for one request; ``avoid`` (the pool that just failed) is skipped when another will do."""
        pools = self._pools
        if len(pools) == 1:
            return pools[0]
        usable = [p for p in pools if p.available and p is not avoid] or [p for p in pools if p is not avoid]
        if self._policy == "sticky" and session_key:
            start = zlib.crc32(session_key.encode()) % len(pools)
            for offset in range(len(pools)):
                candidate = pools[(start + offset) % len(pools)]
                if candidate in usable:
                    return candidate
        if self._policy == "least_busy":
            return min(usable, key=lambda p: p.load)
        for _ in range(len(pools)):
            candidate = pools[next(self._cycle)]
            if candidate in usable:
                return candidate
        return usable[0]


class ProxyHealth:
    """Consecutive-failure ejection of one proxy (Envoy outlier detection's
    ``consecutive_gateway_failure`` with ``base_ejection_time`` growing with each ejection).

    ``failures`` consecutive failures eject the proxy for ``base_seconds * ejections``
    (at most 10x); it is re-admitted when that time has passed, and ejected again,
    for longer, if it keeps failing. ``failures`` 0 disables ejection.
    """

    __slots__ = ("base_seconds", "consecutive", "ejected_until", "ejections", "failures")

    MAX_MULTIPLIER = 10

    def __init__(self, failures: int, base_seconds: float) -> None:
        self.failures = failures
        self.base_seconds = base_seconds
        self.consecutive = 0
        self.ejections = 0
        self.ejected_until = 0.0  # time.monotonic()

    def available(self, now: float) -> bool:
        """Not ejected at monotonic time ``now``."""
        return now >= self.ejected_until

    def success(self) -> None:
        """A request through the proxy worked."""
        self.consecutive = 0

    def failure(self, now: float) -> bool:
        """A proxy failure; returns True when it ejects the proxy now."""
        self.consecutive += 1
        if not self.failures or self.consecutive < self.failures or not self.available(now):
            return False
        self.ejections += 1
        self.ejected_until = now + self.base_seconds * min(self.ejections, self.MAX_MULTIPLIER)
        self.consecutive = 0
        return True
