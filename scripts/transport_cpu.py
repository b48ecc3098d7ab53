"""Service CPU per fetch of each transport and RPC, through a real ``fetchpool serve`` (README
"Transports").

For each round and each transport and RPC (order alternating per round): start ``fetchpool serve
--transport T`` on loopback, warm it with 500 fetches, then one FetchManyPacked ("packed") or
FetchMany ("single": one result per message) of N distinct URLs (``?i=``) at concurrency C
against nginx over TLS + HTTP/2 (the tests' launcher, one worker, keepalive_requests 1,000,000);
every body's length is checked. CPU = the service process's user + system time over the timed
batch (all its threads), divided by N. Prints one JSON line per run and the medians per (size,
transport, RPC), each with its ratio to httpcore "single". Optional ``--py-spy DIR``: a ``py-spy
record`` of the service during the timed batch of an extra first round (raw format, for
``py-spy``'s top entries), left out of the medians.

    .venv/bin/python scripts/transport_cpu.py --rounds 5 -n 5000 -c 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fetchpool.client import FetchClient, make_request
from support import Certs, Nginx, write_site
from support.fetchpool_service import FetchpoolService

SIZES = {"2KB": "small.html", "100KB": "large.html"}


async def batch(target: str, urls: list[str], size: int, concurrency: int, packed: bool) -> tuple[int, set[str]]:
    bad, versions = 0, set()
    async with FetchClient(target, timeout=600, packed=packed) as client:
        async for result in client.fetch_many([make_request(u, id=str(k)) for k, u in enumerate(urls)],
                                              concurrency=concurrency):
            versions.add(result.http_version)
            bad += result.HasField("error") or result.status_code != 200 or len(result.body) != size
    return bad, versions


def run(certs: Certs, nginx: Nginx, root: Path, transport: str, rpc: str, page: str, n: int, c: int, tag: str,
        spy: Path | None) -> dict[str, object]:
    size = (root / page).stat().st_size
    with FetchpoolService("--transport", transport, "--max-batch-concurrency", "1024", ca_pem=certs.ca_pem) as service:
        proc = psutil.Process(service.pid)
        warm = [f"{nginx.https_url}/{page}?warm={k}" for k in range(500)]
        asyncio.run(batch(service.target, warm, size, c, rpc == "packed"))
        urls = [f"{nginx.https_url}/{page}?{tag}={k}" for k in range(n)]
        recorder = None
        if spy is not None:
            recorder = subprocess.Popen(["py-spy", "record", "-p", str(service.pid), "-r", "200", "-f", "raw",
                                         "-o", str(spy / f"{transport}-{rpc}-{page}.txt")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        before, started = proc.cpu_times(), time.monotonic()
        bad, versions = asyncio.run(batch(service.target, urls, size, c, rpc == "packed"))
        after, wall = proc.cpu_times(), time.monotonic() - started
        if recorder is not None:
            recorder.send_signal(2)
            recorder.wait(30)
    cpu = (after.user + after.system) - (before.user + before.system)
    return {"transport": transport, "rpc": rpc, "page": page, "n": n, "c": c, "bad": bad, "versions": sorted(versions),
            "cpu_ms_per_fetch": 1000 * cpu / n, "fetches_per_s": n / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("-c", type=int, default=100)
    ap.add_argument("--transports", default="httpcore,curl")
    ap.add_argument("--rpcs", default="packed,single", help="packed: FetchManyPacked; single: FetchMany")
    ap.add_argument("--py-spy", type=Path, default=None, help="directory for py-spy raw profiles (round 1)")
    args = ap.parse_args()
    if args.py_spy is not None and shutil.which("py-spy") is None:
        ap.error("py-spy is not on PATH")
    variants = [(t, rpc) for t in args.transports.split(",") for rpc in args.rpcs.split(",")]
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        certs = Certs(Path(tmp) / "certs")
        root = Path(tmp) / "site"
        root.mkdir()
        write_site(root)
        with Nginx(root, certs, keepalive_requests=1_000_000) as nginx:
            profiled = args.py_spy is not None
            for r in range(-1 if profiled else 0, args.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for page in SIZES.values():
                    for transport, rpc in order:
                        spy = args.py_spy if r < 0 else None
                        result = run(certs, nginx, root, transport, rpc, page, args.n, args.c, f"r{r}", spy)
                        print(json.dumps({**result, "profiled": r < 0}), flush=True)
                        if r >= 0:
                            results.append(result)
    for label, page in SIZES.items():
        runs = {v: [x for x in results if (x["transport"], x["rpc"], x["page"]) == (*v, page)] for v in variants}
        cpu = {v: statistics.median(float(x["cpu_ms_per_fetch"]) for x in r) for v, r in runs.items()}  # type: ignore[arg-type]
        reference = cpu.get(("httpcore", "single"))
        for (transport, rpc), done in runs.items():
            rate = statistics.median(float(x["fetches_per_s"]) for x in done)  # type: ignore[arg-type]
            ratio = f", {cpu[transport, rpc] / reference:.2f}x httpcore single" if reference else ""
            print(f"h2/{label} {transport} {rpc}: {cpu[transport, rpc]:.3f} ms CPU per fetch{ratio}, {rate:.0f} "
                  f"fetches/s (median of {len(done)}; bad results {sum(int(x['bad']) for x in done)})")  # type: ignore[call-overload]

if __name__ == "__main__":
    main()
