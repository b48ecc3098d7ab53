"""Real ``fetchpool serve`` processes for end-to-end tests.

Services run on the default transport; a module about the pools (fetch_e2e, pool_control,
pool_guarantees) imports ``support.transports.every_transport`` to run once per transport.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fetchpool.config import Settings
from support import Certs
from support.fetchpool_service import FetchpoolService

ServiceFactory = Callable[..., FetchpoolService]


@pytest.fixture(scope="module")
def transport() -> str:
    """The transport of the module's services (``--transport``)."""
    return Settings().fetch.transport


@pytest.fixture
def start_service(certs: Certs, transport: str) -> Iterator[ServiceFactory]:
    """``start_service(*flags, env=...)`` starts a service trusting the tests' CA; all are stopped after the test."""
    started: list[FetchpoolService] = []

    def start(*flags: str, **kwargs: object) -> FetchpoolService:
        service = FetchpoolService("--transport", transport, *flags, ca_pem=certs.ca_pem,
                                   **kwargs)  # type: ignore[arg-type]
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.close()


@pytest.fixture(scope="module")
def service(certs: Certs, transport: str) -> Iterator[FetchpoolService]:
    """One service with embedded defaults (direct), shared by a module's tests."""
    with FetchpoolService("--transport", transport, ca_pem=certs.ca_pem) as running:
        yield running


@pytest.fixture(scope="session")
def node_clients() -> None:
    """tests/node's npm packages installed from its lock (``npm ci``, skipped when already matching)."""
    from support.callers import install_node_clients

    install_node_clients()
