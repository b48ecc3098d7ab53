"""A real gRPC caller of a running ``fetchpool serve``, through ``fetchpool.client.FetchClient``.

``FetchClient`` calls the packed RPCs (several results per message), as any caller that can should.

modes:
  many    one FetchManyPacked call carrying all N requests, concurrency=C; latency percentiles are the
          service's per-fetch ``timings.total_seconds`` (admission to last body byte), since every
          request of the batch is sent at once
  stream  one FetchStreamPacked call, the caller keeping C requests outstanding (a new one goes out as
          each result comes back); latency is measured by the caller, request sent to result in
  resize  like stream, for --duration seconds, while another task changes the pool limits
          every --resize-every seconds through PoolAdmin.SetPoolLimits
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time

from common import Tally, parse_args, report, work
from fetchpool.client import FetchClient, make_request
from fetchpool.v1 import fetch_pb2 as pb

# (max_connections, max_keepalive_connections, max_connections_per_host, max_requests) cycled by
# --mode resize (max_requests 0: max_connections x 100).
RESIZE_SCHEDULE = [
    (100, 100, 0, 0), (4, 4, 0, 16), (50, 10, 0, 0), (1, 1, 0, 1), (20, 20, 5, 0),
    (2, 0, 0, 200), (64, 32, 16, 32), (8, 8, 8, 0), (30, 0, 3, 4), (100, 20, 0, 0),
]


def extra(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--target", required=True, help="service host:port")
    ap.add_argument("--mode", default="many", choices=["many", "stream", "resize"])
    ap.add_argument("--duration", type=float, default=20.0, help="resize: seconds of load")
    ap.add_argument("--resize-every", type=float, default=1.0, help="resize: seconds between two changes")


def check(tally: Tally, seen: bytearray, result: pb.FetchResult, expected: list[bytes], latency: float) -> None:
    i = result.index
    if i >= len(seen) or seen[i]:
        tally.bad += 1
        tally.note(f"result index {i} unexpected or repeated")
        return
    seen[i] = 1
    if result.HasField("error"):
        tally.error(f"{pb.FetchError.Kind.Name(result.error.kind)}: {result.error.message}")
        return
    tally.response(result.status_code, result.body, expected[i], result.http_version, latency)


async def run_many(args: argparse.Namespace, urls: list[str], expected: list[bytes], tally: Tally) -> None:
    seen = bytearray(len(urls))
    async with FetchClient(args.target) as client:
        requests = [make_request(u, id=str(k)) for k, u in enumerate(urls)]
        async for result in client.fetch_many(requests, concurrency=args.c):
            check(tally, seen, result, expected, result.timings.total_seconds)
    tally.errors += seen.count(0)


async def run_stream(
    args: argparse.Namespace, urls: list[str], expected: list[bytes], tally: Tally, deadline: float | None = None
) -> int:
    """Returns how many requests were sent."""
    seen = bytearray(len(urls))
    window = asyncio.Semaphore(args.c)
    sent_at: dict[int, float] = {}

    async def outgoing():  # type: ignore[no-untyped-def]
        for k, u in enumerate(urls):
            await window.acquire()
            if deadline is not None and time.monotonic() > deadline:
                return
            sent_at[k] = time.perf_counter()
            yield make_request(u, id=str(k))

    async with FetchClient(args.target) as client:
        async for result in client.fetch_stream(outgoing()):
            started = sent_at.pop(result.index, None)
            check(tally, seen, result, expected, time.perf_counter() - (started or tally.t0))
            window.release()
    sent = len(urls) if deadline is None else sum(seen) + len(sent_at)
    tally.errors += sent - sum(seen)
    return sent


async def run_resize(args: argparse.Namespace, urls: list[str], expected: list[bytes], tally: Tally) -> dict:
    deadline = time.monotonic() + args.duration
    changes: list[list[int]] = []
    failures: list[str] = []

    async def resizer() -> None:
        async with FetchClient(args.target, timeout=10) as admin:
            for mc, ka, ph, mr in itertools.islice(itertools.cycle(RESIZE_SCHEDULE), 10_000):
                await asyncio.sleep(args.resize_every)
                if time.monotonic() > deadline:
                    return
                try:
                    await admin.set_limits(pb.PoolLimits(
                        max_connections=mc, max_keepalive_connections=ka, max_connections_per_host=ph, max_requests=mr))
                    changes.append([mc, ka, ph, mr])
                except Exception as exc:
                    failures.append(repr(exc)[:200])

    task = asyncio.create_task(resizer())
    try:
        sent = await run_stream(args, urls, expected, tally, deadline)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    async with FetchClient(args.target, timeout=10) as admin:
        stats = await admin.pool_stats()
    return {
        "sent": sent,
        "resizes": len(changes),
        "resize_failures": failures,
        "limits_applied": changes,
        "pools": [
            {"pool": p.pool, "requests_total": p.requests_total,
             "connections_created_total": p.connections_created_total,
             "pool_timeouts_total": p.pool_timeouts_total, "max_connections_now": p.limits.max_connections}
            for p in stats.pools
        ],
    }


async def main() -> int:
    args = parse_args(extra)
    urls, expected = work(args)
    tally = Tally()
    tally.start()
    info: dict = {}
    try:
        if args.mode == "many":
            await run_many(args, urls, expected, tally)
        elif args.mode == "stream":
            await run_stream(args, urls, expected, tally)
        else:
            info = await run_resize(args, urls, expected, tally)
            args.n = info["sent"]
    except Exception as exc:  # the call itself failed: every request not seen is an error
        tally.error(exc)
    tally.stop()
    if args.mode != "resize":
        tally.errors = max(tally.errors, args.n - tally.ok - tally.bad)
    return report(f"fetchpool {args.mode}", args, tally, **info)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
