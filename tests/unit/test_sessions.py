"""Session cookie bounds (engine/sessions.py): count, per-session cookies, idle time, isolation."""

from __future__ import annotations

import httpx
from fetchpool.engine.sessions import SessionCookies


def _response(url: str, *cookies: str) -> httpx.Response:
    return httpx.Response(200, headers=[("set-cookie", c) for c in cookies], request=httpx.Request("GET", url))


def _sent(store: SessionCookies, key: str, url: str = "https://shop.test/") -> str | None:
    request = httpx.Request("GET", url)
    store.add_header(key, request)
    return request.headers.get("cookie")


def test_sessions_are_bounded_least_recently_used_first() -> None:
    store = SessionCookies(max_sessions=2)
    for key in ("a", "b"):
        store.keep(key, _response("https://shop.test/", f"id={key}"))
    assert _sent(store, "a") == "id=a"  # a is now the most recently used
    store.keep("c", _response("https://shop.test/", "id=c"))
    assert len(store) == 2 and _sent(store, "b") is None and _sent(store, "a") == "id=a"


def test_cookies_per_session_are_bounded() -> None:
    store = SessionCookies(max_cookies=3)
    store.keep("a", _response("https://shop.test/", *(f"c{i}={i}" for i in range(10))))
    assert len(_sent(store, "a").split("; ")) == 3


def test_idle_sessions_are_forgotten() -> None:
    now = [0.0]
    store = SessionCookies(idle_seconds=60, clock=lambda: now[0])
    store.keep("old", _response("https://shop.test/", "id=old"))
    now[0] = 30
    store.keep("new", _response("https://shop.test/", "id=new"))
    now[0] = 61
    store.prune()
    assert len(store) == 1 and _sent(store, "new") == "id=new"


def test_a_cookie_goes_only_to_its_domain() -> None:
    store = SessionCookies()
    store.keep("a", _response("https://shop.test/", "id=1"))
    assert _sent(store, "a", "https://other.test/") is None
