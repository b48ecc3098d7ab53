"""Pool control end to end: live limits, stats vs nginx's log, proxies, hygiene, retries."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import grpc
import pytest
from fetchpool.client import FetchClient, make_request
from fetchpool.v1 import fetch_pb2 as pb
from support import AppServer, Certs, Microsocks, Nginx, Tinyproxy
from support.fetchpool_service import FetchpoolService
from support.servers import concurrency_peaks
from support.transports import every_transport  # noqa: F401  (every test here runs once per transport)

Kind = pb.FetchError


async def _collect(client: FetchClient, requests: list[pb.FetchRequest], **kw: int) -> list[pb.FetchResult]:
    return [r async for r in client.fetch_many(requests, **kw)]


async def _eventually(probe, check, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if check(value):
            return value
        assert time.monotonic() < deadline, f"never true; last value: {value}"
        await asyncio.sleep(0.1)


async def _pool(client: FetchClient, index: int = 0) -> pb.PoolStats:
    return (await client.pool_stats()).pools[index]


async def test_resizing_under_load_loses_nothing_and_connections_converge(
    start_service: ..., app_server: AppServer
) -> None:
    service = start_service("--max-connections", "20")
    requests = [make_request(f"{app_server.http_url}/delay?s=0.05&r={i}", id=str(i)) for i in range(600)]
    samples: list[tuple[int, int]] = []
    async with FetchClient(service.target) as client:
        batch = asyncio.create_task(_collect(client, requests, concurrency=40))
        for limit in (5, 30, 8, 3, 12):
            await asyncio.sleep(0.4)
            in_force = await client.set_limits(pb.PoolLimits(max_connections=limit))
            assert in_force.pools["direct"].max_connections == limit
            samples.append((limit, (await _pool(client)).requests_active))
        results = await asyncio.wait_for(batch, 120)
        stats = await _eventually(lambda: _pool(client), lambda s: s.connections_open <= 12)
    assert len(results) == 600 and all(r.status_code == 200 and not r.HasField("error") for r in results)
    assert stats.limits.max_connections == 12 and stats.requests_active == 0
    assert samples  # the limits changed while the batch ran
    assert not batch.cancelled()


async def test_stats_agree_with_nginx_and_max_requests_per_connection(
    start_service: ..., nginx: Nginx, transport: str, request: pytest.FixtureRequest
) -> None:
    service = start_service("--max-connections", "4", "--max-requests-per-connection", "5")
    since = nginx.log_offset()
    requests = [make_request(f"{nginx.http_url}/small.html?mrpc={i}", id=str(i)) for i in range(60)]
    async with FetchClient(service.target) as client:
        results = await _collect(client, requests, concurrency=4)
        stats = await _pool(client)
    assert all(r.status_code == 200 for r in results)
    entries = [e for e in nginx.access_log(since, min_entries=60) if "mrpc=" in e["request_uri"]]
    per_connection = collections.Counter(e["connection"] for e in entries)
    assert max(e["connection_requests"] for e in entries) <= 5
    assert max(per_connection.values()) <= 5
    assert stats.connections_created_total == len(per_connection) >= 12
    assert stats.requests_total == len(entries) == 60
    assert stats.connections_retired_total >= len(per_connection) - 4
    assert stats.reuse_ratio == pytest.approx((60 - len(per_connection)) / 60)


async def test_http2_server_stream_limit_is_respected(start_service: ..., certs: Certs, site_root: Path) -> None:
    with Nginx(site_root, certs, http2_max_concurrent_streams=10) as nginx:
        service = start_service()
        since = nginx.log_offset()
        requests = [make_request(f"{nginx.https_url}/large.html?h2={i}", id=str(i)) for i in range(120)]
        async with FetchClient(service.target) as client:
            results = await _collect(client, requests, concurrency=60)
        entries = [e for e in nginx.access_log(since, min_entries=120) if "h2=" in e["request_uri"]]
    assert all(r.status_code == 200 and r.http_version == "HTTP/2" for r in results)
    assert max(concurrency_peaks(entries)[1].values()) <= 10


async def test_http2_goaway_is_survived(start_service: ..., certs: Certs, site_root: Path) -> None:
    # nginx sends GOAWAY after keepalive_requests streams on an HTTP/2 connection.
    with Nginx(site_root, certs, keepalive_requests=10) as nginx:
        service = start_service()
        requests = [make_request(f"{nginx.https_url}/small.html?goaway={i}", id=str(i)) for i in range(150)]
        async with FetchClient(service.target) as client:
            results = await _collect(client, requests, concurrency=20)
            stats = await _pool(client)
        connections = nginx.distinct_connections(min_entries=150)
    failed = [
        (r.status_code, r.attempts, r.error.message) for r in results if r.status_code != 200 or r.HasField("error")
    ]
    assert not failed, failed[:5]
    assert stats.connections_created_total >= 15 and len(connections) >= 15


async def test_server_closing_idle_keepalive_connections_fails_nothing(start_service: ..., certs: Certs) -> None:
    with AppServer(certs, keep_alive=1) as app:  # hypercorn closes idle connections after 1 s
        service = start_service("--keepalive-expiry", "30")
        async with FetchClient(service.target) as client:
            for round_ in range(4):
                results = await _collect(
                    client, [make_request(f"{app.http_url}/echo?k={round_}-{i}") for i in range(8)], concurrency=8
                )
                assert all(r.status_code == 200 and not r.HasField("error") for r in results)
                await asyncio.sleep(1.2)


async def test_429_with_retry_after_is_retried_after_the_wait(service_app: ..., app_server: AppServer) -> None:
    async with FetchClient(service_app.target) as client:
        result = await client.fetch(f"{app_server.http_url}/flaky?key=ra-{time.time()}&fail=1&status=429&retry_after=1")
        assert (result.status_code, result.attempts) == (200, 2)
        assert result.timings.total_seconds >= 1.0
        # A Retry-After above the maximum is not waited for: the 429 comes back.
        late = await client.fetch(
            f"{app_server.http_url}/flaky?key=late-{time.time()}&fail=1&status=429&retry_after=3600"
        )
        assert (late.status_code, late.attempts) == (429, 1)
        # POST is not idempotent: a 503 is returned, not retried.
        post = await client.fetch(
            make_request(f"{app_server.http_url}/flaky?key=p-{time.time()}&fail=1", method="POST")
        )
        assert (post.status_code, post.attempts) == (503, 1)


@pytest.fixture
def service_app(start_service: ...) -> FetchpoolService:
    return start_service("--retry-attempts", "3", "--max-retry-after", "5")


async def test_proxies_sticky_sessions_and_ejection(start_service: ..., nginx: Nginx, app_server: AppServer) -> None:
    ports = [nginx.https_port, nginx.http_port, app_server.http_port]
    proxies = [Tinyproxy(allow_connect_ports=ports).start() for _ in range(3)]
    try:
        service = start_service(
            "--proxy",
            ",".join(p.url for p in proxies),
            "--proxy-policy",
            "sticky",
            "--proxy-eject-failures",
            "2",
            "--proxy-eject-seconds",
            "5",  # outlasts the 60 fetches below on a loaded machine, so the stats still show it
        )
        url = f"{nginx.https_url}/small.html"
        async with FetchClient(service.target) as client:
            alice = [await client.fetch(make_request(f"{url}?a={i}", session_key="alice")) for i in range(10)]
            assert len({r.pool for r in alice}) == 1
            spread = await _collect(client, [make_request(f"{url}?u={i}", session_key=f"user{i}") for i in range(40)])
            assert len({r.pool for r in spread}) == 3

            victim = proxies[1]
            victim.kill()
            results = await _collect(
                client, [make_request(f"{url}?k={i}", session_key=f"k{i}") for i in range(60)], concurrency=10
            )
            failed = [(r.pool, r.attempts, r.error.message) for r in results if r.status_code != 200]
            assert not failed, (victim.url, failed[:5])
            assert victim.url not in {r.pool for r in results}
            stats = {p.pool: p for p in (await client.pool_stats()).pools}
            assert stats[victim.url].ejected and stats[victim.url].HasField("ejected_until")

            victim.start()
            for _ in range(100):  # the cool-down (bounded: 10 s)
                await asyncio.sleep(0.1)
                if not {p.pool: p for p in (await client.pool_stats()).pools}[victim.url].ejected:
                    break
            back = await _collect(client, [make_request(f"{url}?b={i}", session_key=f"k{i}") for i in range(60)])
            assert all(r.status_code == 200 for r in back)
            assert victim.url in {r.pool for r in back}
    finally:
        for proxy in proxies:
            proxy.close()


async def test_proxy_auth_failure_is_reported_and_credentials_never_leak(start_service: ..., nginx: Nginx) -> None:
    with Tinyproxy(allow_connect_ports=[nginx.https_port], basic_auth=("scraper", "right-secret")) as proxy:
        wrong = proxy.url.replace("right-secret", "wrong-secret")
        service = start_service("--proxy", wrong, "--log-level", "DEBUG")
        async with FetchClient(service.target) as client:
            result = await client.fetch(f"{nginx.https_url}/small.html")
            stats = await client.pool_stats()
            limits = await client.get_limits()
        good = start_service("--proxy", proxy.url)
        async with FetchClient(good.target) as client:
            ok = await client.fetch(f"{nginx.https_url}/small.html?auth=1")
    assert result.error.kind == Kind.PROXY_AUTH and result.attempts == 1
    assert ok.status_code == 200 and ok.http_version == "HTTP/2"
    text = f"{result} {stats} {limits} {service.output()}"
    assert "wrong-secret" not in text and "scraper:" not in text


async def test_socks5_proxy(start_service: ..., nginx: Nginx, site_root: Path) -> None:
    with Microsocks(auth=("sock", "s3cret")) as socks:
        service = start_service("--proxy", socks.url)
        async with FetchClient(service.target) as client:
            result = await client.fetch(f"{nginx.https_url}/large.html?socks=1")
    assert result.status_code == 200 and result.body == (site_root / "large.html").read_bytes()
    assert result.pool == socks.url.replace("sock:s3cret", "REDACTED:REDACTED")


async def test_per_host_cap_and_dynamic_limits(start_service: ..., app_server: AppServer) -> None:
    service = start_service(
        "--max-connections", "40", "--max-requests", "40", "--max-connections-per-host", "3", "--dynamic-limits",
        "--dynamic-floor", "2",
    )
    async with FetchClient(service.target) as client:
        requests = [make_request(f"{app_server.http_url}/delay?s=0.2&c={i}") for i in range(30)]
        batch = asyncio.create_task(_collect(client, requests, concurrency=30))
        peak = 0
        while not batch.done():
            peak = max(peak, (await _pool(client)).requests_active)
            await asyncio.sleep(0.05)
        assert all(r.status_code == 200 for r in batch.result())
        assert 1 <= peak <= 3
        shrunk = await _eventually(lambda: _pool(client), lambda s: s.working_limit < 40, timeout=20)
        assert shrunk.limits.max_requests == 40  # the ceiling stays; the working limit follows demand
        assert shrunk.limits.max_connections == 40


async def test_bad_limits_are_refused_and_the_old_ones_kept(service: FetchpoolService) -> None:
    async with FetchClient(service.target) as client:
        before = await client.get_limits()
        bad = [
            pb.PoolLimits(max_connections=0),
            pb.PoolLimits(max_connections=10, max_keepalive_connections=11),
            pb.PoolLimits(max_connections=10**9),
            pb.PoolLimits(max_connections_per_host=10**6),
        ]
        negative = pb.PoolLimits()
        negative.keepalive_expiry.seconds = -1
        absurd = pb.PoolLimits()
        absurd.pool_timeout.seconds = 10**8
        for limits in [*bad, negative, absurd]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.set_limits(limits)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await client.set_limits(pb.PoolLimits(max_connections=3), pool="nope")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert await client.get_limits() == before


@pytest.mark.parametrize(
    ("proxy", "message"),
    [("ftp://user:pw-secret@127.0.0.1:21", "scheme 'ftp'"), ("http://user@127.0.0.1:3128", "user:password")],
)
def test_bad_proxy_is_refused_at_start_up(certs: Certs, proxy: str, message: str) -> None:
    service = FetchpoolService("--proxy", proxy, ca_pem=certs.ca_pem)
    try:
        with pytest.raises(Exception):  # noqa: B017 - ServerStartError, with the output
            service.start(timeout=10)
        output = service.output()
    finally:
        service.close()
    assert message in output and "pw-secret" not in output
