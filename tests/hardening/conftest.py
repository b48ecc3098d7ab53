"""Fixtures of the hardening suite (issue 6); helpers are in harness.py, servers in hostile.py.

  hostile         session-scoped hostile.HostileServers (HTTP/1.1, TLS, HTTP/2, black hole, ...)
  start_service   start_service(*flags, strict=False, env=...) -> a started FetchpoolService,
                  stopped after the test (loopback allowed unless strict, see harness.make_service)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import make_service
from hostile import HostileServers
from support import Certs
from support.fetchpool_service import FetchpoolService


@pytest.fixture(scope="session")
def hostile(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileServers]:
    with HostileServers(certs, tmp_path_factory.mktemp("hostile")) as servers:
        yield servers


@pytest.fixture
def start_service(certs: Certs) -> Iterator[object]:
    """``start_service(*flags, strict=False, env=...)``; every service is stopped after the test."""
    started: list[FetchpoolService] = []

    def start(*flags: str, **kwargs: object) -> FetchpoolService:
        service = make_service(certs, *flags, **kwargs)
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.close()
