"""aiohttp: one ClientSession over a TCPConnector(limit=100, limit_per_host=C) pool, C workers.
HTTP/1.1 only (aiohttp has no HTTP/2 client)."""

from __future__ import annotations

import asyncio
import ssl
import sys
import time

import aiohttp
from common import Tally, parse_args, report, work


async def main() -> int:
    args = parse_args()
    urls, expected = work(args)
    ctx: ssl.SSLContext | bool = ssl.create_default_context(cafile=args.cacert) if args.cacert else True
    proxy = args.proxy or None
    tally = Tally()
    tally.start()
    connector = aiohttp.TCPConnector(limit=100, limit_per_host=args.c, ssl=ctx)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=args.timeout))

    async def fetch(k: int) -> None:
        t0 = time.perf_counter()
        try:
            async with session.get(urls[k], proxy=proxy) as r:
                body = await r.read()
                proto = f"HTTP/{r.version.major}.{r.version.minor}" if r.version else "?"
            tally.response(r.status, body, expected[k], proto, time.perf_counter() - t0)
        except Exception as exc:
            tally.error(exc)

    todo = iter(range(args.n))

    async def worker() -> None:
        for k in todo:
            await fetch(k)

    await asyncio.gather(*(worker() for _ in range(min(args.c, args.n))))
    tally.stop()
    await session.close()
    return report(f"aiohttp {aiohttp.__version__}", args, tally)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
