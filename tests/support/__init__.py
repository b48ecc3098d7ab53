"""Test infrastructure: real servers on loopback ports (nginx, tinyproxy, squid, a hypercorn app),
a test CA, and the static content nginx serves. Imported as ``support`` (tests/ is on sys.path
through the rootdir conftest)."""

from .certs import SERVER_IDENTITIES, CertPair, Certs
from .process import INSTALL_HINT, MissingBinaryError, ServerProcess, ServerStartError, free_port
from .servers import AppServer, Microsocks, Nginx, Squid, Tinyproxy
from .site import DOC_PACKAGE, DOC_ROOT, SITE_PAGES, doc_pages, write_site

__all__ = [
    "DOC_PACKAGE",
    "DOC_ROOT",
    "INSTALL_HINT",
    "SERVER_IDENTITIES",
    "SITE_PAGES",
    "AppServer",
    "CertPair",
    "Certs",
    "Microsocks",
    "MissingBinaryError",
    "Nginx",
    "ServerProcess",
    "ServerStartError",
    "Squid",
    "Tinyproxy",
    "doc_pages",
    "free_port",
    "write_site",
]
