"""Pool transports: the HTTP engines a pool can sit on, behind one seam (``base.PoolTransport``).

``httpcore`` is httpx's own engine (pure Python, with fetchpool's fixes under it); ``curl`` is
libcurl through pycurl. ``--transport`` chooses one for every pool of the process.
"""

from __future__ import annotations

from fetchpool.config import TRANSPORTS
from fetchpool.engine.transports.base import (
    RECORDER_EXTENSION,
    ConnectionCounts,
    PoolTransport,
    TransportConfig,
)

__all__ = ["RECORDER_EXTENSION", "TRANSPORTS", "ConnectionCounts", "PoolTransport", "TransportConfig",
           "make_transport"]


def make_transport(name: str, config: TransportConfig) -> PoolTransport:
    """The transport ``name`` (one of :data:`TRANSPORTS`) for one pool; raises ValueError for
    another name. Each engine is imported only when chosen."""
    if name == "httpcore":
        from fetchpool.engine.transports.httpcore import HttpcoreTransport

        return HttpcoreTransport(config)
    if name == "curl":
        from fetchpool.engine.transports.curl import CurlTransport

        return CurlTransport(config)
    raise ValueError(f"unknown transport {name!r} (one of {', '.join(TRANSPORTS)})")
