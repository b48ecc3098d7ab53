"""Fixtures of the in-process engine tests (issue 12): ``fetchpool.engine.fetcher.Engine`` in the
test's event loop against the session's real servers (tests/conftest.py), no fetchpool process.

  make_engine   ``await make_engine(settings)`` -> an entered Engine, closed after the test
  proxy_url     {"direct": None, "squid": ..., "tinyproxy": ..., "socks5": ...}: the route's proxy URL
  transport     every test here runs once per transport (httpcore, curl): enginekit.make_settings
                gives engines the test's
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import enginekit
import pytest
from fetchpool.config import TRANSPORTS, Settings
from fetchpool.engine import Engine
from support import Microsocks, Squid, Tinyproxy

MakeEngine = Callable[[Settings], Awaitable[Engine]]


@pytest.fixture(params=TRANSPORTS, autouse=True)
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    enginekit.TRANSPORT[0] = request.param
    yield request.param
    enginekit.TRANSPORT[0] = "httpcore"


@pytest.fixture
async def make_engine() -> AsyncIterator[MakeEngine]:
    engines: list[Engine] = []

    async def make(settings: Settings) -> Engine:
        engine = await Engine(settings).__aenter__()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.aclose()


@pytest.fixture
def proxy_url(request: pytest.FixtureRequest) -> Callable[[str], str | None]:
    """``proxy_url(route)``: starts the route's shared proxy on first use."""

    def url(route: str) -> str | None:
        if route == "direct":
            return None
        fixture = {"squid": "squid", "tinyproxy": "tinyproxy", "socks5": "socks"}[route]
        server: Squid | Tinyproxy | Microsocks = request.getfixturevalue(fixture)
        return server.url

    return url
