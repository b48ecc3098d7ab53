"""``max_requests_per_connection`` is exact on every transport, protocol and route: nginx logs
at most that many requests on any connection, every request is sent once and succeeds, and the
pool's stats still match the sockets the OS shows and count no connection retired twice. (The
curl transport used to overshoot it: libcurl has no such limit; see
engine/transports/curl/retire.py.)"""

from __future__ import annotations

import asyncio
import collections
import uuid
from pathlib import Path

import pytest
from enginekit import ROUTES, assert_engine_invariant, make_settings, summary
from fetchpool.config import PoolLimits, PoolPolicy
from fetchpool.engine import Engine, FetchSpec
from support import AppServer, Certs, Nginx

LIMIT = 5
REQUESTS = 60
# Plain http through an HTTP proxy is forwarded on the proxy's own connections to nginx (its
# log shows those); every other route tunnels ours.
CASES = [(route, scheme) for route in ROUTES for scheme in ("https", "http")
         if scheme == "https" or route not in ("squid", "tinyproxy")]


@pytest.mark.parametrize(("route", "scheme"), CASES)
async def test_no_connection_carries_more_than_max_requests_per_connection(
    route: str, scheme: str, make_engine: ..., proxy_url: ..., certs: Certs, nginx: Nginx, app_server: AppServer,
) -> None:
    limits = PoolLimits(max_connections=4, max_keepalive_connections=4, pool_timeout=10)
    engine: Engine = await make_engine(make_settings(
        certs, proxy=proxy_url(route), limits=limits, policy=PoolPolicy(max_requests_per_connection=LIMIT)))
    base = nginx.https_url if scheme == "https" else nginx.http_url
    run = uuid.uuid4().hex[:12]
    since = nginx.log_offset()
    slots = asyncio.Semaphore(20)  # over HTTP/2, many requests share a connection at once

    async def fetch(i: int) -> object:
        async with slots:
            return await engine.fetch(FetchSpec(url=f"{base}/small.html?run={run}&i={i}"))

    async with asyncio.timeout(60):
        outcomes = await asyncio.gather(*(fetch(i) for i in range(REQUESTS)))
    failed = [o for o in outcomes if not o.ok or o.status_code != 200 or o.attempts != 1]  # type: ignore[attr-defined]
    assert not failed, summary(failed)  # type: ignore[arg-type]
    assert {o.http_version for o in outcomes} == {"HTTP/2" if scheme == "https" else "HTTP/1.1"}  # type: ignore[attr-defined]
    entries = [e for e in nginx.access_log(since, min_entries=REQUESTS) if f"run={run}" in e["request_uri"]]
    per_connection = collections.Counter(e["connection"] for e in entries)
    assert len(entries) == REQUESTS, f"nginx logged {len(entries)} requests of {REQUESTS}"
    assert max(per_connection.values()) <= LIMIT, per_connection
    assert max(e["connection_requests"] for e in entries) <= LIMIT
    await assert_engine_invariant(engine, [base], app_server, f"{REQUESTS} requests at {LIMIT} per connection")
    stats = engine.snapshots()[0]  # after the upkeep closed what was left: none counted twice
    assert 0 < stats.connections_retired_total <= stats.connections_created_total, stats


async def test_each_connection_retired_at_its_limit_is_counted_once(
    make_engine: ..., certs: Certs, nginx: Nginx, app_server: AppServer,
) -> None:
    """One request per connection, ten in a row: ten connections created, ten retired, also
    after the upkeep closed the last one (curl counted a connection shut down at its limit
    again when the upkeep closed it)."""
    engine: Engine = await make_engine(make_settings(certs, policy=PoolPolicy(max_requests_per_connection=1)))
    for i in range(10):
        outcome = await engine.fetch(FetchSpec(url=f"{nginx.https_url}/small.html?once={i}"))
        assert outcome.ok and outcome.attempts == 1, summary([outcome])
    await assert_engine_invariant(engine, [nginx.https_url], app_server, "ten requests, one per connection",
                                  probe=False)
    stats = engine.snapshots()[0]
    assert (stats.connections_created_total, stats.connections_retired_total) == (10, 10), stats


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_connections_retired_while_requests_wait_are_counted(
    scheme: str, make_engine: ..., certs: Certs, nginx: Nginx, app_server: AppServer,
) -> None:
    """One connection allowed, one request per connection, three requests at once: each
    connection is closed at its limit to make room for the next request waiting (httpcore's
    pool closed those without counting them: 0 retired, seen in a run of the test above)."""
    limits = PoolLimits(max_connections=1, max_keepalive_connections=1, pool_timeout=10)
    engine: Engine = await make_engine(make_settings(
        certs, limits=limits, policy=PoolPolicy(max_requests_per_connection=1)))
    base = nginx.https_url if scheme == "https" else nginx.http_url
    outcomes = await asyncio.gather(*(engine.fetch(FetchSpec(url=f"{base}/small.html?w={i}")) for i in range(3)))
    assert all(o.ok and o.attempts == 1 for o in outcomes), summary(list(outcomes))
    await assert_engine_invariant(engine, [base], app_server, "three requests on one connection at a time",
                                  probe=False)
    stats = engine.snapshots()[0]
    assert (stats.connections_created_total, stats.connections_retired_total) == (3, 3), stats


async def test_a_request_held_back_does_not_wait_behind_a_slow_response(
    make_engine: ..., certs: Certs, site_root: Path, tmp_path: Path,
) -> None:
    """Limit 2: the first request and a slow download (100 KB at 25 KB/s) take the connection's
    two; the next request goes on another connection at once instead of waiting for the
    download to end (curl held it until then, found by a newcomer's try: a 3 s deadline ran out)."""
    slow = f"        location /slow/ {{ alias {site_root}/; limit_rate 25k; }}\n"
    with Nginx(site_root, certs, extra_locations=slow, workdir=tmp_path / "nginx") as nginx:
        limits = PoolLimits(max_connections=4, max_keepalive_connections=4, pool_timeout=10)
        engine: Engine = await make_engine(make_settings(
            certs, limits=limits, policy=PoolPolicy(max_requests_per_connection=2)))
        first = await engine.fetch(FetchSpec(url=f"{nginx.https_url}/small.html?first"))
        assert first.ok, summary([first])
        download = asyncio.ensure_future(engine.fetch(FetchSpec(url=f"{nginx.https_url}/slow/large.html")))
        await asyncio.sleep(0.3)
        third = await engine.fetch(FetchSpec(url=f"{nginx.https_url}/small.html?third"))
        assert third.ok and third.attempts == 1, summary([third])
        assert not download.done(), "the request waited for the download on its connection to end"
        assert (await download).ok
