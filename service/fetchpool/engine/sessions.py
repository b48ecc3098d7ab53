"""Cookies kept per session key, for the fetches that ask for them (``keep_cookies``).

The pod's one client is shared by every caller, so it keeps no cookies of its own. A fetch with
a ``session_key`` and ``keep_cookies`` gets the cookies earlier responses of that session set
(RFC 6265 matching, through httpx's ``Cookies`` and the standard library's cookie jar) and keeps
the ones its own responses set. Sessions never share cookies, and what is kept is bounded: at
most :data:`MAX_SESSIONS` sessions (the least recently used go first), :data:`MAX_COOKIES`
cookies each, and a session unused for :data:`IDLE_SECONDS` is forgotten.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import httpx

MAX_SESSIONS = 10_000
MAX_COOKIES = 200
IDLE_SECONDS = 3600.0


class SessionCookies:
    """Cookie jars by session key; times in seconds from ``clock``."""

    def __init__(self, *, max_sessions: int = MAX_SESSIONS, max_cookies: int = MAX_COOKIES,
                 idle_seconds: float = IDLE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_sessions = max_sessions
        self._max_cookies = max_cookies
        self._idle = idle_seconds
        self._clock = clock
        self._sessions: collections.OrderedDict[str, tuple[httpx.Cookies, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def _jar(self, key: str) -> httpx.Cookies:
        jar = self._sessions.pop(key, (httpx.Cookies(), 0.0))[0]
        self._sessions[key] = (jar, self._clock())
        while len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)
        return jar

    def add_header(self, key: str, request: httpx.Request) -> None:
        """Add the session's cookies for ``request``'s URL as its ``Cookie`` header (unless the
        caller set one)."""
        if key in self._sessions:
            self._jar(key).set_cookie_header(request)

    def keep(self, key: str, response: httpx.Response) -> None:
        """Keep the cookies ``response`` sets, within the session's bound (expired ones first out)."""
        jar = self._jar(key)
        jar.extract_cookies(response)
        if len(jar.jar) > self._max_cookies:
            jar.jar.clear_expired_cookies()
            for cookie in list(jar.jar)[self._max_cookies:]:
                jar.jar.clear(cookie.domain, cookie.path, cookie.name)

    def prune(self) -> None:
        """Forget the sessions unused for longer than the idle time (the engine's upkeep calls it)."""
        horizon = self._clock() - self._idle
        while self._sessions and next(iter(self._sessions.values()))[1] < horizon:
            self._sessions.popitem(last=False)
