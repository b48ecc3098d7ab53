"""Issue 15 §4: connections are the budget, streams are not.

``max_connections`` caps a pool's sockets, ``max_requests`` its requests in flight. Over HTTP/2
a connection carries as many requests as the server's SETTINGS_MAX_CONCURRENT_STREAMS allows,
and when every stream of a connection is taken the next request gets another connection, up
to ``max_connections`` (Go's transport with ``StrictMaxConcurrentStreams = false``), instead
of queueing behind it; beyond that it waits for a stream. Checked here against nginx with
``http2_max_concurrent_streams 4`` whose ``/slow/`` location sends at 100 KB/s, so that each
100 KB response holds its stream for about a second: nginx's log says how many connections
carried the requests and how many streams each had open at once, its error log whether any
stream was refused.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from enginekit import assert_engine_invariant, make_settings, peer, summary
from fetchpool.config import PoolLimits, RetryPolicy
from fetchpool.engine import Engine, FetchSpec, Outcome
from fetchpool.engine.batch import run_batch
from fetchpool.engine.fetcher import TEND_INTERVAL
from support import AppServer, Certs, Microsocks, Nginx, Tinyproxy
from support.coalesce import delaying_relay
from support.servers import concurrency_peaks
from support.sockets import tcp_sockets

STREAMS = 4
CONNECTIONS = 5


@pytest.fixture(scope="module")
def streams_nginx(site_root: Path, certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    slow = f"        location /slow/ {{ alias {site_root}/; limit_rate 100k; }}\n"
    with Nginx(site_root, certs, http2_max_concurrent_streams=STREAMS, extra_locations=slow,
               workdir=tmp_path_factory.mktemp("nginx-streams")) as server:
        yield server


@pytest.fixture(scope="module")
def streams_proxy(streams_nginx: Nginx) -> Iterator[Tinyproxy]:
    with Tinyproxy(allow_connect_ports=streams_nginx.ports()) as proxy:
        yield proxy


def _proxy(route: str, streams_proxy: Tinyproxy, socks: Microsocks) -> str | None:
    return {"direct": None, "tinyproxy": streams_proxy.url, "socks5": socks.url}[route]


async def _sample_sockets(peers: set[tuple[str, int]], samples: list[int]) -> None:
    while True:
        samples.append(len(tcp_sockets(peers)))
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("route", ["direct", "tinyproxy", "socks5"])
async def test_a_full_http2_connection_sends_the_next_request_to_another_connection(
    route: str, make_engine: ..., certs: Certs, streams_nginx: Nginx, streams_proxy: Tinyproxy, socks: Microsocks,
    app_server: AppServer, transport: str, request: pytest.FixtureRequest,
) -> None:
    # 30 requests: 5 connections x 4 streams carry 20 at once, the other 10 wait for a stream.
    proxy = _proxy(route, streams_proxy, socks)
    limits = PoolLimits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS, keepalive_expiry=1.0,
                        pool_timeout=20)
    engine: Engine = await make_engine(make_settings(certs, proxy=proxy, limits=limits))
    run = uuid.uuid4().hex[:12]
    since, errors_since = streams_nginx.log_offset(), streams_nginx.error_log_path.stat().st_size
    peers = {peer(proxy)} if proxy else {peer(streams_nginx.https_url)}
    sockets: list[int] = []
    sampler = asyncio.create_task(_sample_sockets(peers, sockets))
    try:
        async with asyncio.timeout(60):
            outcomes = await asyncio.gather(*(
                engine.fetch(FetchSpec(url=f"{streams_nginx.https_url}/slow/large.html?run={run}&i={i}"))
                for i in range(30)))
    finally:
        sampler.cancel()
    stats = engine.snapshots()[0]

    failed = [o for o in outcomes if not o.ok or o.status_code != 200 or o.attempts != 1]
    assert not failed, summary(failed)
    assert {o.http_version for o in outcomes} == {"HTTP/2"}
    entries = [e for e in streams_nginx.access_log(since, min_entries=30) if f"run={run}" in e["request_uri"]]
    total_peak, per_connection = concurrency_peaks(entries)
    assert len(per_connection) == CONNECTIONS, f"nginx saw {len(per_connection)} connections, not {CONNECTIONS}"
    assert max(per_connection.values()) <= STREAMS, per_connection  # the server's limit, never passed
    assert total_peak >= CONNECTIONS * STREAMS, f"at most {total_peak} requests at nginx at once"
    errors = streams_nginx.error_log_path.read_bytes()[errors_since:].decode(errors="replace")
    assert "concurrent streams exceeded" not in errors
    assert max(sockets) <= CONNECTIONS, f"{max(sockets)} sockets at once for max_connections {CONNECTIONS}"
    assert stats.connections_created_total == CONNECTIONS
    await assert_engine_invariant(engine, [streams_nginx.https_url], app_server, f"30 slow requests ({route})")


async def test_max_requests_caps_requests_in_flight_over_http2(
    make_engine: ..., certs: Certs, streams_nginx: Nginx, app_server: AppServer, transport: str
) -> None:
    # Room for 20 streams, but max_requests 6: at most 6 at nginx at once, the rest wait in admission.
    # (The curl transport carries one request per connection until it knows the server's stream
    # limit, learned by the first request and followed at the next upkeep: CurlTransport.requests_cap.)
    cap = 6
    limits = PoolLimits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS, max_requests=6,
                        pool_timeout=20)
    engine: Engine = await make_engine(make_settings(certs, limits=limits))
    assert (await engine.fetch(FetchSpec(url=f"{streams_nginx.https_url}/small.html?first"))).ok
    await asyncio.sleep(TEND_INTERVAL * 1.5)
    run = uuid.uuid4().hex[:12]
    since = streams_nginx.log_offset()
    fetches = [asyncio.ensure_future(engine.fetch(FetchSpec(url=f"{streams_nginx.https_url}/slow/large.html?"
                                                            f"run={run}&i={i}"))) for i in range(12)]
    await asyncio.sleep(0.3)
    busy = engine.snapshots()[0]
    outcomes = await asyncio.gather(*fetches)
    assert all(o.ok and o.status_code == 200 for o in outcomes), summary(outcomes)
    assert (busy.requests_active, busy.requests_waiting, busy.working_limit) == (cap, 12 - cap, cap), busy
    entries = [e for e in streams_nginx.access_log(since, min_entries=12) if f"run={run}" in e["request_uri"]]
    total_peak, per_connection = concurrency_peaks(entries)
    assert total_peak <= cap and len(per_connection) == 2, (total_peak, per_connection)
    await assert_engine_invariant(engine, [streams_nginx.https_url], app_server, "max_requests 6")


async def test_waiting_for_a_connection_after_admission_is_bounded_by_the_pool_timeout(
    make_engine: ..., certs: Certs, app_server: AppServer
) -> None:
    # Admitted (max_requests 2) but the only HTTP/1.1 connection is busy for 3 s: the second
    # fetch waits in the transport, within what admission left of pool_timeout.
    limits = PoolLimits(max_connections=1, max_keepalive_connections=1, max_requests=2, pool_timeout=0.5)
    engine: Engine = await make_engine(make_settings(certs, limits=limits))
    slow = asyncio.ensure_future(engine.fetch(FetchSpec(url=f"{app_server.http_url}/delay?s=3&slow=1")))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    starved = await engine.fetch(FetchSpec(url=f"{app_server.http_url}/delay?s=0&starved=1"))
    waited = time.monotonic() - started
    assert starved.error_kind is not None and starved.error_kind.name == "POOL_TIMEOUT", starved
    assert waited < 2.5, f"the pool timeout of 0.5 s let the fetch wait {waited:.1f} s"
    assert engine.snapshots()[0].pool_timeouts_total == 1
    assert (await slow).status_code == 200
    await assert_engine_invariant(engine, [app_server.http_url], app_server, "a pool timeout in the transport")


#: (max_connections, max_keepalive_connections, max_requests) cycled while the load runs.
RESIZES = [(5, 5, 0), (2, 2, 12), (8, 0, 3), (1, 1, 1), (3, 3, 40), (6, 2, 0), (1, 0, 8), (5, 5, 0)]


async def test_limits_resized_live_under_load_fail_nothing(
    make_engine: ..., certs: Certs, streams_nginx: Nginx, app_server: AppServer
) -> None:
    # HTTP/2 (4 streams a connection) and HTTP/1.1 at once, 2 KB and 100 KB, while
    # max_connections, max_keepalive_connections and max_requests change every 0.25 s.
    limits = PoolLimits(max_connections=5, max_keepalive_connections=5, pool_timeout=30)
    engine: Engine = await make_engine(make_settings(certs, limits=limits))
    run = uuid.uuid4().hex[:12]
    bases = [streams_nginx.https_url, streams_nginx.http_url]
    pages = itertools.cycle(itertools.product(bases, ["small.html", "large.html"]))
    urls: list[str] = []
    applied: list[tuple[int, int, int]] = []

    async def items() -> AsyncIterator[tuple[str, FetchSpec]]:
        # At least 800 URLs, and load until every resize of the cycle has been made (a fast
        # transport fetches 800 in under a second); bounded at 20,000.
        for i, (base, page) in enumerate(pages):
            if i >= 20_000 or (i >= 800 and len(applied) >= len(RESIZES)):
                return
            urls.append(f"{base}/{page}?run={run}&i={i}")
            yield urls[-1], FetchSpec(url=urls[-1])

    async def resize() -> None:
        for connections, keepalive, requests in itertools.cycle(RESIZES):
            await asyncio.sleep(0.25)
            engine.set_limits({"max_connections": connections, "max_keepalive_connections": keepalive,
                               "max_requests": requests})
            applied.append((connections, keepalive, requests))

    resizer = asyncio.create_task(resize())
    outcomes: dict[str, Outcome] = {}
    started = time.monotonic()
    try:
        async with asyncio.timeout(90):
            async for url, outcome in run_batch(engine, items(), 60):
                outcomes[url] = outcome
    finally:
        resizer.cancel()
    failed = [o for o in outcomes.values() if not o.ok or o.status_code != 200]
    assert len(outcomes) == len(urls) and not failed, summary(failed)
    assert len(applied) >= 4, f"only {len(applied)} resizes in {time.monotonic() - started:.1f} s"
    engine.set_limits({"max_connections": 5, "max_keepalive_connections": 5, "max_requests": 0})
    await assert_engine_invariant(engine, bases, app_server, "a load while the limits changed")


async def test_a_first_request_cancelled_before_the_servers_settings_hands_on_its_place(
    make_engine: ..., certs: Certs, streams_nginx: Nginx, transport: str
) -> None:
    # The first request to an origin goes alone until its answer: its connection's SETTINGS tell
    # the server's stream limit. Cancelled before they arrive (here the server's first bytes come
    # 0.5 s late), it taught nothing: one of the 40 requests held behind it goes first instead.
    # Before, all 40 went at once on connections whose limit was not known: 96 streams refused.
    limits = PoolLimits(max_connections=50, max_keepalive_connections=50, pool_timeout=30)
    engine: Engine = await make_engine(make_settings(certs, limits=limits, retry=RetryPolicy(attempts=1)))
    run = uuid.uuid4().hex[:12]
    since, errors_since = streams_nginx.log_offset(), streams_nginx.error_log_path.stat().st_size
    async with delaying_relay(("127.0.0.1", streams_nginx.https_port), 0.5) as port:
        url = f"https://127.0.0.1:{port}/slow/large.html?run={run}"
        first = asyncio.ensure_future(engine.fetch(FetchSpec(url=f"{url}&i=first")))
        await asyncio.sleep(0.1)
        rest = [asyncio.ensure_future(engine.fetch(FetchSpec(url=f"{url}&i={i}"))) for i in range(40)]
        await asyncio.sleep(0.1)
        first.cancel()
        async with asyncio.timeout(60):
            outcomes = await asyncio.gather(*rest)
    failed = [o for o in outcomes if not o.ok or o.status_code != 200 or o.attempts != 1]
    assert not failed, summary(failed)
    errors = streams_nginx.error_log_path.read_bytes()[errors_since:].decode(errors="replace")
    assert errors.count("concurrent streams exceeded") == 0
    entries = [e for e in streams_nginx.access_log(since, min_entries=40) if f"run={run}&i=" in e["request_uri"]]
    assert len([e for e in entries if "i=first" not in e["request_uri"]]) == 40
