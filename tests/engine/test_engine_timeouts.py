"""Timeouts as a result reports them, in-process against the real app server, on every transport."""

from __future__ import annotations

from enginekit import make_settings
from fetchpool.config import Timeouts
from fetchpool.engine import FetchSpec
from fetchpool.errors import ErrorKind
from support import AppServer, Certs


async def test_a_response_that_stalls_on_a_reused_connection_is_a_read_timeout(
    make_engine, certs: Certs, app_server: AppServer
) -> None:
    # A reused connection has no connect phase: a silence there is a read timeout, and a POST
    # that was sent is not sent again (a connect timeout would say it never left).
    engine = await make_engine(make_settings(certs, timeouts=Timeouts(connect=5, read=1, request=20)))
    warm = await engine.fetch(FetchSpec(url=f"{app_server.http_url}/delay?s=0"))
    assert warm.ok and warm.status_code == 200
    stalled = await engine.fetch(FetchSpec(url=f"{app_server.http_url}/delay?s=4&stall=1", method="POST", body=b"x"))
    assert stalled.error_kind is ErrorKind.TIMEOUT, stalled
    assert "read" in stalled.error_message and "connect" not in stalled.error_message, stalled.error_message
    assert stalled.attempts == 1, stalled
