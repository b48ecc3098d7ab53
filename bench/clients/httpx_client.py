"""httpx (or the API-compatible httpx2 fork) written the way people write it by hand.

modes:
  pooled    one shared AsyncClient(http2=True, Limits(100, keep-alive 20)) for every request
            (the seed's PooledProxyScraper), C workers under asyncio.gather
  unpooled  a new AsyncClient (same arguments) per request, the seed's "without pooling";
            the SSLContext is built once and shared (a fresh certifi context per client would
            cost ~35 ms CPU per request and measure OpenSSL, not pooling)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ssl
import sys
import time

from common import Tally, parse_args, report, work


def extra(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--mode", default="pooled", choices=["pooled", "unpooled"])
    ap.add_argument("--lib", default="httpx", choices=["httpx", "httpx2"])
    ap.add_argument("--http1", action="store_true", help="http2=False")


async def main() -> int:
    args = parse_args(extra)
    httpx = importlib.import_module(args.lib)
    urls, expected = work(args)
    ctx = ssl.create_default_context(cafile=args.cacert) if args.cacert else True
    kwargs = dict(
        http2=not args.http1,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        timeout=httpx.Timeout(args.timeout),
        verify=ctx,
        proxy=args.proxy or None,
    )
    tally = Tally()

    async def fetch(client: object, k: int) -> None:
        t0 = time.perf_counter()
        try:
            if client is None:
                async with httpx.AsyncClient(**kwargs) as own:
                    r = await own.get(urls[k])
            else:
                r = await client.get(urls[k])  # type: ignore[attr-defined]
            tally.response(r.status_code, r.content, expected[k], r.http_version, time.perf_counter() - t0)
        except Exception as exc:
            tally.error(exc)

    tally.start()
    client = httpx.AsyncClient(**kwargs) if args.mode == "pooled" else None
    todo = iter(range(args.n))

    async def worker() -> None:
        for k in todo:
            await fetch(client, k)

    await asyncio.gather(*(worker() for _ in range(min(args.c, args.n))))
    tally.stop()
    if client is not None:
        await client.aclose()
    return report(f"{args.lib} {httpx.__version__} {args.mode}", args, tally)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
