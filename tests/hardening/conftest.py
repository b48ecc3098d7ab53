"""Fixtures of the hardening suite (issue 6); helpers are in harness.py, servers in hostile.py.

  hostile         session-scoped hostile.HostileServers (HTTP/1.1, TLS, HTTP/2, black hole, ...)
  start_service   start_service(*flags, strict=False, env=...) -> a started FetchpoolService on the
                  test's transport, stopped after the test (loopback allowed unless strict, see
                  harness.make_service); every test that uses it runs once per transport
  transport       httpcore or curl (--transport)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fetchpool.config import TRANSPORTS
from harness import make_service
from hostile import HostileServers
from support import Certs
from support.fetchpool_service import FetchpoolService


@pytest.fixture(scope="session")
def hostile(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileServers]:
    with HostileServers(certs, tmp_path_factory.mktemp("hostile")) as servers:
        yield servers


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def start_service(certs: Certs, transport: str) -> Iterator[object]:
    """``start_service(*flags, strict=False, env=...)``; every service is stopped after the test."""
    started: list[FetchpoolService] = []

    def start(*flags: str, **kwargs: object) -> FetchpoolService:
        service = make_service(certs, "--transport", transport, *flags, **kwargs)
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.close()
