"""Shared by the benchmark clients. Standard library only: the same code also runs in the
httpx2 venv, which has nothing but httpx2.

Every client gets the same work: ``-n`` URLs with distinct query strings over one or more base
URLs (``--url``, each with the file its body must equal, ``--expect``), ``-c`` requests in flight,
and prints one JSON line. A response counts as ok only if its status is 200 and its body equals
the expected bytes; anything else is ``bad`` (wrong answer) or ``errors`` (no answer).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path


def parse_args(extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", action="append", required=True, help="base URL without query string; repeatable")
    ap.add_argument("--expect", action="append", required=True, help="file the body must equal; one per --url")
    ap.add_argument("-n", type=int, default=1000, help="requests")
    ap.add_argument("-c", type=int, default=50, help="requests in flight")
    ap.add_argument("--proxy", default="", help="forward proxy URL (CONNECT for https)")
    ap.add_argument("--cacert", default="", help="CA bundle to trust")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    ap.add_argument("--run-id", default="", help="goes into every query string")
    if extra:
        extra(ap)
    args = ap.parse_args()
    if len(args.url) != len(args.expect):
        ap.error("give one --expect per --url")
    return args


def work(args: argparse.Namespace) -> tuple[list[str], list[bytes]]:
    """The URLs of this run and, per URL, the body expected."""
    run = args.run_id or os.urandom(4).hex()
    bodies = [Path(p).read_bytes() for p in args.expect]
    urls, expected = [], []
    for k in range(args.n):
        j = k % len(args.url)
        urls.append(f"{args.url[j]}?i={k}&r={run}")
        expected.append(bodies[j])
    return urls, expected


def cpu_now() -> float:
    """CPU seconds of this process, all threads (nanosecond clock, not 10 ms ticks)."""
    return time.process_time()


class Tally:
    """Counts and latencies of one run; ``timer`` marks the timed window."""

    def __init__(self) -> None:
        self.ok = 0
        self.bad = 0
        self.errors = 0
        self.latencies: list[float] = []
        self.protos: collections.Counter[str] = collections.Counter()
        self.first_error = ""
        self.t0 = self.c0 = self.wall = self.cpu = 0.0

    def start(self) -> None:
        self.t0, self.c0 = time.perf_counter(), cpu_now()

    def stop(self) -> None:
        self.wall, self.cpu = time.perf_counter() - self.t0, cpu_now() - self.c0

    def response(self, status: int, body: bytes, expected: bytes, proto: str, latency: float) -> None:
        if status == 200 and body == expected:
            self.ok += 1
            self.latencies.append(latency)
            self.protos[proto] += 1
        else:
            self.bad += 1
            self.note(f"status {status}, {len(body)} bytes, expected 200 and {len(expected)} bytes")

    def error(self, exc: BaseException | str) -> None:
        self.errors += 1
        self.note(exc if isinstance(exc, str) else repr(exc))

    def note(self, text: str) -> None:
        if not self.first_error:
            self.first_error = text[:300]


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM) in MB. Not ru_maxrss: Linux carries the parent's peak
    across fork+exec into it, so a child of a 50 MB parent would never report less."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def report(client: str, args: argparse.Namespace, tally: Tally, **extra: object) -> int:
    """Print the JSON line; returns the exit status (0 only if every request was ok)."""
    lat = sorted(x * 1000.0 for x in tally.latencies)
    out = {
        "client": client,
        "n": args.n,
        "c": args.c,
        "ok": tally.ok,
        "bad": tally.bad,
        "errors": tally.errors,
        "wall_s": round(tally.wall, 4),
        "rps": round(tally.ok / tally.wall, 1) if tally.wall > 0 else None,
        "p50_ms": round(pct(lat, 0.50) or 0, 2) if lat else None,
        "p99_ms": round(pct(lat, 0.99) or 0, 2) if lat else None,
        "cpu_window_s": round(tally.cpu, 4),
        "cpu_process_s": round(cpu_now(), 3),
        "maxrss_mb": round(peak_rss_mb(), 1),
        "proto": dict(tally.protos),
        **extra,
    }
    if tally.first_error:
        out["first_error"] = tally.first_error
    print(json.dumps(out), flush=True)
    return 0 if tally.ok == args.n and not tally.bad and not tally.errors else 3
