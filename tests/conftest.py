"""Session-wide real servers on loopback for all tests (see tests/support/).

Fixtures (all session-scoped, started on first use, stopped at session end):
  certs       support.Certs: test CA (ca_pem, client_context()) and server cert for 127.0.0.1/localhost/::1
  site_root   Path of the generated pages (support.SITE_PAGES: small.html 2 KiB, large.html 100 KiB)
  doc_root    Path of Debian's python3.11-doc HTML, served by nginx under /doc/
  doc_pages   its HTML pages as relative paths ("library/os.html"): URL = f"{nginx.https_url}/doc/{page}"
  doc_files   all its regular files likewise (~1060: HTML pages, their sources, images, scripts)
  nginx       support.Nginx serving site_root, doc_root under /doc/ (keepalive_requests 1000, nginx's default)
  nginx_goaway  the same with keepalive_requests 20: an HTTP/2 connection gets GOAWAY after 20 streams
  app_server  support.AppServer (tests/support/app.py under hypercorn)
  tinyproxy   support.Tinyproxy, CONNECT allowed to the nginx and app_server ports
  squid       support.Squid, CONNECT allowed to the nginx and app_server ports
  socks       support.Microsocks, a SOCKS5 proxy without authentication
  (tinyproxy and squid also allow CONNECT to nginx_goaway's ports)
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
    Microsocks,
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
def doc_files(doc_root: Path) -> list[str]:
    # Symlinks left out: Debian links some files to other packages, which may be absent.
    return sorted(
        path.relative_to(doc_root).as_posix()
        for path in doc_root.rglob("*")
        if path.is_file() and not path.is_symlink()
    )


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


#: keepalive_requests of nginx_goaway: small, so a batch of the doc site meets dozens of GOAWAYs.
GOAWAY_AFTER = 20


@pytest.fixture(scope="session")
def nginx_goaway(
    site_root: Path, certs: Certs, doc_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    workdir = tmp_path_factory.mktemp("nginx-goaway")
    yield from _serve(
        lambda: Nginx(site_root, certs, aliases={"/doc/": doc_root}, keepalive_requests=GOAWAY_AFTER, workdir=workdir)
    )


def _target_ports(*servers: Nginx | AppServer) -> list[int]:
    return [port for server in servers for port in server.ports()]


@pytest.fixture(scope="session")
def tinyproxy(
    nginx: Nginx, nginx_goaway: Nginx, app_server: AppServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tinyproxy]:
    workdir = tmp_path_factory.mktemp("tinyproxy")
    ports = _target_ports(nginx, nginx_goaway, app_server)
    yield from _serve(lambda: Tinyproxy(allow_connect_ports=ports, workdir=workdir))


@pytest.fixture(scope="session")
def squid(nginx: Nginx, nginx_goaway: Nginx, app_server: AppServer) -> Iterator[Squid]:
    ports = _target_ports(nginx, nginx_goaway, app_server)
    yield from _serve(lambda: Squid(allow_connect_ports=ports))


@pytest.fixture(scope="session")
def socks() -> Iterator[Microsocks]:
    yield from _serve(Microsocks)
