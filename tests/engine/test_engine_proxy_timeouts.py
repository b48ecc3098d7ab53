"""A proxy that accepts a connection and never answers: opening through it is bounded by the
connect timeout (TCP, CONNECT or the SOCKS5 handshake, TLS), not by the read timeout meant for
targets' answers, and it is the proxy's failure (PROXY), so it counts towards ejection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from enginekit import make_settings
from fetchpool.config import PoolPolicy, RetryPolicy, Timeouts
from fetchpool.engine import FetchSpec
from fetchpool.errors import ErrorKind
from support import AppServer, Certs


@pytest.fixture
async def silent_proxy() -> AsyncIterator[int]:
    """A port that accepts connections, reads what comes and never writes a byte."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(4096):
            pass

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for writer in held:
        writer.close()
    await server.wait_closed()


@pytest.mark.parametrize("scheme", ["http", "socks5"])
async def test_a_silent_proxy_fails_within_the_connect_timeout_and_is_ejected(
    make_engine, certs: Certs, app_server: AppServer, silent_proxy: int, scheme: str, transport: str
) -> None:
    # libcurl times the SOCKS5 handshake inside "connect" and cannot tell a silent SOCKS5 proxy
    # from a silent target's TLS: the README's transport table says so.
    kind = ErrorKind.TIMEOUT if transport == "curl" and scheme == "socks5" else ErrorKind.PROXY
    settings = make_settings(
        certs, proxy=f"{scheme}://127.0.0.1:{silent_proxy}", timeouts=Timeouts(connect=1.0, read=20.0),
        retry=RetryPolicy(attempts=1), policy=PoolPolicy(proxy_eject_failures=2, proxy_eject_seconds=30.0),
    )
    engine = await make_engine(settings)
    for _ in range(2):
        started = time.monotonic()
        outcome = await engine.fetch(FetchSpec(url=f"{app_server.https_url}/echo", timeout=15))
        assert outcome.error_kind is kind, outcome.error_message
        assert time.monotonic() - started < 5, "bounded by the read timeout (20 s), not the connect timeout (1 s)"
        if kind is ErrorKind.PROXY:
            # The connect timeout bounds TCP and CONNECT together; libcurl's end of TCP is the
            # moment it noticed, which a loaded loop makes late. The proxy's silence took most.
            timings = outcome.timings
            assert 0.9 <= timings.connect + timings.proxy_connect < 5 and timings.proxy_connect > 0.5, timings
    [pool] = engine.snapshots()
    assert pool.ejected is (kind is ErrorKind.PROXY)
