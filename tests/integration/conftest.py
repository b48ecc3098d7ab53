"""Real ``fetchpool serve`` processes for end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from support import Certs
from support.fetchpool_service import FetchpoolService

ServiceFactory = Callable[..., FetchpoolService]


@pytest.fixture
def start_service(certs: Certs) -> Iterator[ServiceFactory]:
    """``start_service(*flags, env=...)`` starts a service trusting the tests' CA; all are stopped after the test."""
    started: list[FetchpoolService] = []

    def start(*flags: str, **kwargs: object) -> FetchpoolService:
        service = FetchpoolService(*flags, ca_pem=certs.ca_pem, **kwargs)  # type: ignore[arg-type]
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.close()


@pytest.fixture(scope="module")
def service(certs: Certs) -> Iterator[FetchpoolService]:
    """One service with embedded defaults (direct), shared by a module's tests."""
    with FetchpoolService(ca_pem=certs.ca_pem) as running:
        yield running


@pytest.fixture(scope="session")
def node_clients() -> None:
    """tests/node's npm packages installed from its lock (``npm ci``, skipped when already matching)."""
    from support.callers import install_node_clients

    install_node_clients()
