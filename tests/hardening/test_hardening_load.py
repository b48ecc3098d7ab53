"""A bounded load test: 20,000 requests from 500 concurrent callers through a pool of 50, against
nginx on loopback. Every request is answered, the pool stays within its limit, and the service's
memory stays bounded (it does not grow with the number of requests served)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fetchpool.client import FetchClient, make_request
from fetchpool.v1 import fetch_pb2 as pb
from harness import SERVING, proc_status
from support import SITE_PAGES, Nginx

TOTAL = 20_000
CALLERS = 500
PER_CALLER = TOTAL // CALLERS
BATCH_CALLERS = 100  # of the 500, these send one FetchMany of PER_CALLER; the others unary Fetch calls
POOL = 50
MiB = 1024 * 1024


def _url(nginx: Nginx, n: int) -> tuple[str, str]:
    page = "large.html" if n % 10 == 0 else "small.html"  # 10% of 100 KiB bodies
    base = nginx.https_url if n % 4 == 0 else nginx.http_url  # a quarter over HTTP/2
    return f"{base}/{page}?load={n}", page


async def test_20000_requests_500_callers_pool_of_50(start_service: ..., nginx: Nginx, site_root: Path) -> None:
    service = start_service("--max-connections", str(POOL), "--max-batch-concurrency", "1024")
    sizes = {page: (site_root / page).stat().st_size for page in SITE_PAGES}
    answered: dict[int, tuple[int, int]] = {}
    marks: dict[str, int] = {}

    def rss() -> int:
        return proc_status(service.pid)["VmRSS"] * 1024

    async with FetchClient(service.target, timeout=120) as client:
        warm = [make_request(_url(nginx, n)[0], id=str(n)) for n in range(-500, 0)]
        warmed = [r.status_code async for r in client.fetch_many(warm, concurrency=POOL)]
        assert warmed == [200] * len(warm)
        marks["baseline"] = rss()

        def record(result: pb.FetchResult) -> None:
            n = int(result.id)
            assert n not in answered, f"request {n} answered twice"
            answered[n] = (result.status_code if not result.HasField("error") else -result.error.kind,
                           len(result.body))
            if len(answered) == TOTAL // 2:
                marks["half"] = rss()

        async def unary(caller: int) -> None:
            for i in range(PER_CALLER):
                n = caller * PER_CALLER + i
                record(await client.fetch(make_request(_url(nginx, n)[0], id=str(n), timeout=60)))

        async def batch(caller: int) -> None:
            numbers = range(caller * PER_CALLER, (caller + 1) * PER_CALLER)
            requests = [make_request(_url(nginx, n)[0], id=str(n), timeout=60) for n in numbers]
            async for result in client.fetch_many(requests, concurrency=8):
                record(result)

        callers = [unary(c) for c in range(CALLERS - BATCH_CALLERS)]
        callers += [batch(c) for c in range(CALLERS - BATCH_CALLERS, CALLERS)]
        await asyncio.wait_for(asyncio.gather(*callers), 150)
        marks["end"] = rss()
        peak = proc_status(service.pid)["VmHWM"] * 1024
        stats = (await client.pool_stats()).pools[0]
        assert await client.health() == SERVING

    assert sorted(answered) == list(range(TOTAL))
    wrong = {n: got for n, got in answered.items() if got != (200, sizes[_url(nginx, n)[1]])}
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {list(wrong.items())[:5]}"
    assert stats.requests_total >= TOTAL + 500 and stats.connections_open <= POOL
    # Bounded memory: at most a few hundred requests' bodies are in the process at once (500
    # callers, 10% of 100 KiB), and the second half of the run does not add to the first.
    assert peak - marks["baseline"] < 200 * MiB, {k: v // MiB for k, v in marks.items()} | {"peak": peak // MiB}
    assert marks["end"] - marks["half"] < 64 * MiB, {k: v // MiB for k, v in marks.items()}
