"""Keepalive and long calls (issue 13, §2): callers that ping every 10 s, as gRPC's own keepalive
example does, hold an idle FetchStream for over a minute without being cut, with grpcio and
@grpc/grpc-js; a policy that refuses such pings does cut them (so the clients really ping); a
connection past --grpc-max-connection-age never loses a call still running on it."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import pytest
from support import AppServer
from support.callers import ReflectedClient, run_node


def _python_options(ping_ms: int) -> list[tuple[str, int]]:
    """The README's recommended grpcio options (pinging every ``ping_ms``)."""
    return [("grpc.keepalive_time_ms", ping_ms), ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


def _node_options(ping_ms: int) -> dict[str, int]:
    return {"grpc.keepalive_time_ms": ping_ms, "grpc.keepalive_timeout_ms": 5000,
            "grpc.keepalive_permit_without_calls": 1}


def _hold_python(target: str, url: str, ping_ms: int, idle: float) -> tuple[list[str], str]:
    """A FetchStream that gets one result, stays idle ``idle`` seconds, then sends another:
    (ids received, "" or the error that ended the call)."""
    with ReflectedClient(target, _python_options(ping_ms)) as client:
        first = threading.Event()

        def requests() -> Any:
            yield client.request(id="before", url=url)
            first.wait(30)
            time.sleep(idle)
            yield client.request(id="after", url=url)

        received = []
        try:
            for result in client.fetch_stream(requests(), timeout=idle + 60):
                assert result.status_code == 200, result
                received.append(result.id)
                first.set()
        except grpc.RpcError as exc:
            return received, f"{exc.code().name}: {exc.details()}"
    return received, ""


async def _hold_node(target: str, url: str, ping_ms: int, idle: float) -> tuple[list[str], str]:
    results, done = await run_node({
        "target": target, "rpc": "FetchStream", "channel_options": _node_options(ping_ms),
        "requests": [{"id": "before", "url": url}, {"id": "after", "url": url}],
        "steps": [{"send": 0}, {"await": 1}, {"sleep_ms": int(idle * 1000)}, {"send": 1}, {"await": 2}],
    }, timeout=idle + 60)
    return [r["id"] for r in results], "" if done["code"] == 0 else f"{done['code']}: {done['details']}"


async def _both(target: str, url: str, ping_ms: int, idle: float) -> list[tuple[list[str], str]]:
    return list(await asyncio.gather(asyncio.to_thread(_hold_python, target, url, ping_ms, idle),
                                     _hold_node(target, url, ping_ms, idle)))


@pytest.mark.slow
async def test_default_policy_keeps_streams_pinged_every_10_s_alive_for_over_a_minute(
    start_service: ..., app_server: AppServer, node_clients: None
) -> None:
    fetchpool = start_service()
    # The same callers against gRPC's own server defaults (5 min between pings, none without calls).
    grpc_defaults = start_service("--grpc-min-ping-interval", "300", "--grpc-permit-keepalive-without-calls", "false")
    url = f"{app_server.http_url}/echo?keepalive"
    kept, cut = await asyncio.gather(_both(fetchpool.target, url, 10_000, 65),
                                     _both(grpc_defaults.target, url, 10_000, 65))
    assert kept == [(["before", "after"], "")] * 2
    for received, error in cut:
        assert received == ["before"] and error, (received, error)
    assert "many pings" in cut[0][1].lower()  # grpcio reports the GOAWAY's reason


async def test_the_minimum_ping_interval_is_the_flag(
    start_service: ..., app_server: AppServer, node_clients: None
) -> None:
    url = f"{app_server.http_url}/echo?interval"
    accepting = start_service("--grpc-min-ping-interval", "0.5")
    refusing = start_service("--grpc-min-ping-interval", "2")
    kept, cut = await asyncio.gather(_both(accepting.target, url, 1000, 8), _both(refusing.target, url, 1000, 8))
    assert kept == [(["before", "after"], "")] * 2
    assert all(received == ["before"] and error for received, error in cut), cut


def _batch_over(target: str, url: str, count: int, options: list[tuple[str, Any]]) -> tuple[int, str]:
    """(results received, "" or the error) of one FetchMany of ``count`` requests to ``url``."""
    with ReflectedClient(target, options) as client:
        received = 0
        try:
            for result in client.fetch_many([client.request(id=str(i), url=f"{url}&i={i}") for i in range(count)],
                                            timeout=30):
                assert result.status_code == 200, result
                received += 1
        except grpc.RpcError as exc:
            return received, exc.code().name
    return received, ""


def test_max_connection_age_never_cuts_a_running_call(start_service: ..., app_server: AppServer) -> None:
    service = start_service("--grpc-max-connection-age", "1")
    url = f"{app_server.http_url}/delay?s=4"
    with ReflectedClient(service.target) as client:
        results = [r.status_code for r in client.fetch_many([client.request(url=f"{url}&n={i}") for i in range(3)],
                                                             timeout=30)]
        assert results == [200] * 3  # the call outlived the connection's age by 3 s
        time.sleep(1.5)
        assert client.fetch(url=f"{app_server.http_url}/echo?after", timeout=10).status_code == 200  # reconnected
    # With a grace, the rule is the grace: a call still running after it is cut.
    graced = start_service("--grpc-max-connection-age", "1", "--grpc-max-connection-age-grace", "1")
    received, error = _batch_over(graced.target, f"{app_server.http_url}/delay?s=6", 1, [])
    assert (received, error) == (0, "UNAVAILABLE")


async def test_server_pings_find_a_dead_caller_and_free_its_fetches(
    start_service: ..., app_server: AppServer, node_clients: None
) -> None:
    """A caller frozen mid-call (SIGSTOP: its kernel still acknowledges TCP, nothing answers the
    pings) is dropped after --grpc-keepalive-time + --grpc-keepalive-timeout, and its fetch stops."""
    import json
    import signal
    import subprocess

    from fetchpool.client import FetchClient
    from support.callers import NODE_DIR, PROTO_PATH

    service = start_service("--grpc-keepalive-time", "1", "--grpc-keepalive-timeout", "1")
    job = {"proto_path": PROTO_PATH, "target": service.target, "rpc": "FetchStream",
           "requests": [{"url": f"{app_server.http_url}/delay?s=60&frozen"}], "steps": [{"send": 0}, {"await": 1}]}
    caller = subprocess.Popen(  # noqa: ASYNC220 (it runs beside the test; starting it does not block)
        ["node", str(NODE_DIR / "client.js"), json.dumps(job)], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        async with FetchClient(service.target) as client:
            async def active() -> int:
                return (await client.pool_stats()).pools[0].requests_active

            deadline = time.monotonic() + 20
            while await active() != 1:
                assert time.monotonic() < deadline, "the caller's fetch never started"
                await asyncio.sleep(0.1)
            caller.send_signal(signal.SIGSTOP)
            frozen = time.monotonic()
            while await active() != 0:
                assert time.monotonic() - frozen < 15, "the dead caller's fetch is still running"
                await asyncio.sleep(0.2)
            assert time.monotonic() - frozen >= 1  # found by the pings, not by anything else
    finally:
        caller.kill()
        caller.wait(10)
