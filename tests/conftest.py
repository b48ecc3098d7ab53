"""Session-wide real servers on loopback for all tests (see tests/support/).

Fixtures (all session-scoped, started on first use, stopped at session end):
  certs       support.Certs: test CA (ca_pem, client_context()) and server cert for 127.0.0.1/localhost/::1
  site_root   Path of the generated pages (support.SITE_PAGES: small.html 2 KiB, large.html 100 KiB)
  doc_root    Path of Debian's python3.11-doc HTML, served by nginx under /doc/
  doc_pages   its HTML pages as relative paths ("library/os.html"): URL = f"{nginx.https_url}/doc/{page}"
  nginx       support.Nginx serving site_root, doc_root under /doc/
  app_server  support.AppServer (tests/support/app.py under hypercorn)
  tinyproxy   support.Tinyproxy, CONNECT allowed to the nginx and app_server ports
  squid       support.Squid, CONNECT allowed to the nginx and app_server ports
A test may stop or kill a shared server: it is started again (same ports) after that test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from support import (
    DOC_ROOT,
    AppServer,
    Certs,
    MissingBinaryError,
    Nginx,
    ServerProcess,
    Squid,
    Tinyproxy,
    write_site,
)
from support import (
    doc_pages as list_doc_pages,
)

ServerT = TypeVar("ServerT", bound=ServerProcess)

# Shared servers started in this session, to restart after a test that stopped one.
_shared_servers: list[ServerProcess] = []


def _serve(make: Callable[[], ServerT]) -> Iterator[ServerT]:
    """Build and start a shared server, yield it, stop it at session end.

    A missing binary fails the requesting test with the install hint rather than skipping it.
    """
    try:
        server = make()
        server.start()
    except MissingBinaryError as exc:
        pytest.fail(str(exc), pytrace=False)
    _shared_servers.append(server)
    try:
        yield server
    finally:
        _shared_servers.remove(server)
        server.close()


@pytest.fixture(autouse=True)
def _restart_stopped_shared_servers() -> Iterator[None]:
    yield
    for server in _shared_servers:
        server.ensure_running()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def site_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    write_site(root)
    return root


@pytest.fixture(scope="session")
def doc_pages() -> list[str]:
    try:
        return list_doc_pages(DOC_ROOT)
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def doc_root(doc_pages: list[str]) -> Path:
    # Through doc_pages, so a missing doc package fails with the install hint here too.
    return DOC_ROOT


@pytest.fixture(scope="session")
def nginx(
    site_root: Path, certs: Certs, doc_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    workdir = tmp_path_factory.mktemp("nginx")
    yield from _serve(lambda: Nginx(site_root, certs, aliases={"/doc/": doc_root}, workdir=workdir))


@pytest.fixture(scope="session")
def app_server(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    workdir = tmp_path_factory.mktemp("app")
    yield from _serve(lambda: AppServer(certs, workdir=workdir))


def _target_ports(nginx: Nginx, app_server: AppServer) -> list[int]:
    return [*nginx.ports(), *app_server.ports()]


@pytest.fixture(scope="session")
def tinyproxy(
    nginx: Nginx, app_server: AppServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tinyproxy]:
    workdir = tmp_path_factory.mktemp("tinyproxy")
    ports = _target_ports(nginx, app_server)
    yield from _serve(lambda: Tinyproxy(allow_connect_ports=ports, workdir=workdir))


@pytest.fixture(scope="session")
def squid(nginx: Nginx, app_server: AppServer) -> Iterator[Squid]:
    ports = _target_ports(nginx, app_server)
    yield from _serve(lambda: Squid(allow_connect_ports=ports))
