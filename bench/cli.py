"""``python -m bench``: fetchpool against what people write by hand, on the same URLs, same run.

    python -m bench                 # full run (~15-20 min on 2 cores)
    python -m bench --smoke         # a few hundred requests per client, ~30 s (make test runs it)
    python -m bench --rounds 1 --cells h2/2KB,lat-h2/2KB --no-memory --no-resize   # a quick look

Writes bench/results/bench-<stamp>.{json,md,png} (and latest.*), prints the table on stdout,
progress on stderr. Exit status 0 when every client completed every request with the right body
(goal misses are reported, not errors), 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.extra import memory_run, profile_run, resize_run
from bench.infra import BENCH, Env, Workspace, log, run_proc
from bench.matrix import (
    CLIENT_LABELS,
    FETCHPOOL,
    LATENCY,
    REFERENCE_TRANSPORT,
    SCENARIOS,
    Cell,
    Runner,
    default_transport,
    ensure_httpx2,
    python_for,
    run_cells,
    run_keys,
    split_key,
    transport_flags,
)
from bench.netns import run_phase
from bench.render import chart, render
from bench.report import goals, summarize

SMOKE_CELLS = "h1/2KB,h2/100KB,proxy/2KB,lat-h2/2KB,lat500-h2/2KB"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny run: every client, every path, a few seconds each")
    ap.add_argument("-n", "--n", type=int, default=None, help="URLs per client run (1000; smoke 100)")
    ap.add_argument("-c", "--c", type=int, default=50, help="requests in flight per client (50)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3; smoke 1)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}")
    ap.add_argument("--sizes", default="2KB,100KB", help="page sizes of the loopback scenarios")
    ap.add_argument("--latency-sizes", default="2KB", help="page sizes of the latency scenarios")
    ap.add_argument("--cells", default="", help="explicit scenario/size list (overrides the three above)")
    ap.add_argument("--clients", default=",".join(CLIENT_LABELS), help="subset of the clients")
    ap.add_argument("--transports", default=None,
                    help=f"fetchpool serve transports to run, each on every cell (default: {default_transport()}, "
                         f"fetchpool's default; the CPU goals compare with {REFERENCE_TRANSPORT}, run too if absent)")
    ap.add_argument("--wide-n", type=int, default=None, help="URLs per run on lat500-h2 (3000; smoke 150)")
    ap.add_argument("--wide-c", type=int, default=None, help="requests in flight on lat500-h2 (500; smoke 100)")
    ap.add_argument("--ns-n", type=int, default=None, help="URLs per run in the latency scenarios (= N)")
    ap.add_argument("--rtt-ms", type=float, default=50.0, help="emulated round-trip time (50)")
    ap.add_argument("--wrk-secs", type=float, default=None, help="wrk duration (3; smoke 1)")
    ap.add_argument("--proxy-server", choices=["squid", "tinyproxy"], default="squid")
    ap.add_argument("--mem-n", type=int, default=None, help="URLs of the memory batch (100000; smoke 2000)")
    ap.add_argument("--mem-cell", default="h2/2KB", help="where the memory batch fetches from")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--resize-secs", type=float, default=None, help="resize-under-load seconds (20; smoke 3)")
    ap.add_argument("--resize-every", type=float, default=1.0)
    ap.add_argument("--no-resize", action="store_true")
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                    help="py-spy the service: auto = when a fetchpool goal is missed (never in smoke)")
    ap.add_argument("--profile-n", type=int, default=5000)
    ap.add_argument("--profile-cells", default="",
                    help="cells to profile, comma-separated (default: h2/2KB and the cell with the worst "
                         "fetchpool/httpx ratio)")
    ap.add_argument("--req-timeout", type=float, default=30.0)
    ap.add_argument("--proc-timeout", type=float, default=300.0, help="hard limit per client process, s")
    ap.add_argument("--seed", default="fetchpool-bench")
    ap.add_argument("--out", default=str(BENCH / "results"), help="results folder")
    ap.add_argument("--inner", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    smoke = a.smoke
    a.n = a.n or (100 if smoke else 1000)
    a.ns_n = a.ns_n or a.n
    a.rounds = a.rounds or (1 if smoke else 3)
    a.wrk_secs = a.wrk_secs or (1.0 if smoke else 3.0)
    a.mem_n = a.mem_n or (2000 if smoke else 100_000)
    a.resize_secs = a.resize_secs or (3.0 if smoke else 20.0)
    a.wide_n = a.wide_n or (150 if smoke else 3000)
    a.wide_c = a.wide_c or (100 if smoke else 500)
    a.default_transport = default_transport()
    a.transport_list = [t for t in (a.transports or a.default_transport).split(",") if t]
    if REFERENCE_TRANSPORT not in a.transport_list:  # the CPU goals are ratios to it, in the same run
        a.transport_list.append(REFERENCE_TRANSPORT)
    if smoke and a.profile == "auto":
        a.profile = "never"
    if smoke and not a.cells:
        a.cells = SMOKE_CELLS
    if a.cells:
        a.cell_list = [Cell(*c.split("/")) for c in a.cells.split(",") if c]
    else:
        a.cell_list = [Cell(s, z) for s in a.scenarios.split(",") if s
                       for z in (a.latency_sizes if s in LATENCY else a.sizes).split(",") if z]
    a.client_list = [c for c in a.clients.split(",") if c]
    bad = [c.key for c in a.cell_list if c.scenario not in SCENARIOS or c.size not in ("2KB", "100KB")]
    bad += [c for c in a.client_list if c not in CLIENT_LABELS]
    if bad:
        ap.error(f"unknown cells or clients: {bad}")
    for transport in a.transport_list:
        try:
            transport_flags(transport)
        except ValueError as exc:
            ap.error(str(exc))
    return a


def versions(httpx2_note: str) -> str:
    def sh(cmd: str) -> str:
        try:
            p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20)
            text = (p.stdout + p.stderr).strip()
            return text.splitlines()[0] if text else "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    import importlib.metadata as md

    libs = ", ".join(f"{p} {md.version(p)}" for p in ("httpx", "httpcore", "h2", "aiohttp", "grpcio", "protobuf"))
    return (f"{libs}; {httpx2_note}; {sh('nginx -v')}; {sh('squid -v')}; {sh('tinyproxy -v')}; "
            f"{sh('wrk -v')}").replace("|", "/")


def code_state() -> dict[str, str]:
    """Which fetchpool was measured: HEAD, whether service/ differs from it, a hash of its sources."""
    import hashlib

    from bench.infra import REPO

    digest = hashlib.sha256()
    for path in sorted((REPO / "service" / "fetchpool").rglob("*.py")):
        digest.update(path.as_posix().encode() + path.read_bytes())

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    return {"head": git("rev-parse", "--short", "HEAD"),
            "service_uncommitted": "yes" if git("status", "--porcelain", "--", "service") else "no",
            "sources_sha256": digest.hexdigest()[:12]}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pick_profile_cells(summary: dict[str, Any], cells: list[Cell], wanted: str, transport: str) -> list[Cell]:
    if wanted:
        return [Cell(*w.split("/")) for w in wanted.split(",") if w]
    worst = _worst_cell(summary, cells, transport)
    picks = [Cell("h2", "2KB")] + ([worst] if worst and worst != Cell("h2", "2KB") else [])
    return [c for c in picks if not c.latency]


def _worst_cell(summary: dict[str, Any], cells: list[Cell], transport: str) -> Cell | None:
    host = [c for c in cells if not c.latency]
    worst, worst_ratio = None, None
    for c in host:
        r = summary.get(c.key, {}).get("ratios", {}).get(transport, {})
        vals = [v for v in (r.get("FM/httpx"), r.get("FS/httpx")) if v]
        cpu = [v for v in (r.get("FM cpu/httpx cpu"), r.get("FS cpu/httpx cpu")) if v]
        score = min(vals + [1 / v for v in cpu]) if vals or cpu else None
        if score is not None and (worst_ratio is None or score < worst_ratio):
            worst, worst_ratio = c, score
    return worst or (host[0] if host else None)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.inner:
        from bench.netns import inner_main

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return inner_main(a.inner)
    if os.geteuid() != 0 and any(c.latency for c in a.cell_list):
        log("not root: the latency scenarios (network namespace) are skipped")
        a.cell_list = [c for c in a.cell_list if not c.latency]
    for tool in ("nginx", "wrk", a.proxy_server):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            log(f"{tool} is missing: run `make system-deps` (scripts/install-system-deps.sh)")
            return 2

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.time()
    code_before = code_state()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    log(f"fetchpool bench: {os.cpu_count()} cores, N={a.n}, C={a.c}, rounds={a.rounds}, "
        f"cells={','.join(c.key for c in a.cell_list)}, clients={','.join(a.client_list)}, "
        f"transports={','.join(a.transport_list)} (default {a.default_transport})")

    httpx2_note = "httpx2 not used"
    if "httpx2" in a.client_list:
        why = ensure_httpx2()
        if why:
            log(f"httpx2 unavailable, its rows are left out: {why}")
            a.client_list.remove("httpx2")
            httpx2_note = f"httpx2 NOT installed ({why[:120]})"
        else:
            v = run_proc([python_for("httpx2"), "-c", "import httpx2; print(httpx2.__version__)"], timeout=60)
            httpx2_note = f"httpx2 {v.stdout.strip()} (own venv)"

    ws = Workspace.create()
    env = Env(ws, proxy_kind=a.proxy_server, batch_concurrency=a.c)
    results: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}  # per transport
    resize: dict[str, Any] = {}
    profiles: list[dict[str, Any]] = []
    latency: dict[str, Any] = {}
    loads: list[float] = []
    try:
        env.start()
        runner = Runner(env, ws, n=a.n, c=a.c, wrk_secs=a.wrk_secs, req_timeout=a.req_timeout,
                        proc_timeout=a.proc_timeout, wide=(a.wide_n, a.wide_c))
        host_cells = [c for c in a.cell_list if not c.latency]
        results += run_cells(runner, host_cells, a.client_list, a.rounds, a.seed, a.transport_list)
        loads.append(os.getloadavg()[0])
        for transport in a.transport_list:
            if not a.no_memory:
                memory[transport] = memory_run(env, ws, n=a.mem_n, c=a.c, cell=Cell(*a.mem_cell.split("/")),
                                               transport=transport)
            if not a.no_resize:
                resize[transport] = resize_run(env, ws, secs=a.resize_secs, every=a.resize_every, c=a.c,
                                               transport=transport)
        lat_cells = [c for c in a.cell_list if c.latency]
        if lat_cells:
            spec = {"workspace": ws.to_json(), "proxy_kind": a.proxy_server, "n": a.ns_n, "c": a.c,
                    "wide": [a.wide_n, a.wide_c], "wrk_secs": a.wrk_secs, "req_timeout": a.req_timeout,
                    "proc_timeout": a.proc_timeout, "rtt_ms": a.rtt_ms,
                    "cells": [[c.scenario, c.size] for c in lat_cells], "clients": a.client_list,
                    "transports": a.transport_list, "rounds": a.rounds, "seed": a.seed}
            latency = run_phase(spec, timeout=3600)
            if latency.get("error"):
                log(f"latency phase: {latency['error']}")
            results += latency.get("results", [])
        loads.append(os.getloadavg()[0])
        summary = summarize(results)
        goal_rows = goals(summary, memory, resize, a.default_transport)
        fp_missed = any(g["verdict"].startswith("MISS") for g in goal_rows if "RSS" not in g["goal"]
                        and "resize" not in g["goal"] and g["transport"] == a.default_transport)
        if a.profile == "always" or (a.profile == "auto" and fp_missed):
            for transport in a.transport_list:
                for cell in pick_profile_cells(summary, a.cell_list, a.profile_cells, transport):
                    profiles.append(profile_run(env, ws, cell=cell, n=a.profile_n, c=a.c, outdir=outdir, stamp=stamp,
                                                transport=transport))
    except KeyboardInterrupt:
        log("interrupted: stopping everything this run started")
        return 130
    finally:
        env.close()
        ws.close()

    summary = summarize(results)
    goal_rows = goals(summary, memory, resize, a.default_transport)
    meta = {
        "smoke": a.smoke, "finished": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(),
        "cpu_model": cpu_model(), "kernel": platform.release(), "python": f"Python {platform.python_version()}",
        "load": f"{min(loads or [0]):.2f}-{max(loads or [0]):.2f} (1-min avg at phase ends)",
        "n": a.n, "ns_n": a.ns_n, "c": a.c, "wide_n": a.wide_n, "wide_c": a.wide_c, "rounds": a.rounds,
        "proxy": a.proxy_server, "transports": a.transport_list, "default_transport": a.default_transport,
        "versions": versions(httpx2_note), "elapsed_s": round(time.time() - t_start),
        "code": code_before, "code_changed_during_run": code_state()["sources_sha256"] != code_before["sources_sha256"],
        "args": {k: v for k, v in vars(a).items() if k not in ("cell_list", "client_list", "transport_list")},
    }
    if meta["code_changed_during_run"]:
        log("WARNING: service/fetchpool changed while the benchmark ran: the figures mix two versions")
    text = render(meta, summary, goal_rows, memory, resize, profiles, latency.get("info"), results)
    text += f"\n_Total bench time {meta['elapsed_s']} s. Raw per-run data: bench-{stamp}.json._\n"
    data = {"meta": meta, "latency_info": latency.get("info"), "latency_error": latency.get("error"),
            "summary": summary, "goals": goal_rows, "memory": memory, "resize": resize, "profiles": profiles,
            "results": results}
    paths = {ext: outdir / f"bench-{stamp}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(data, indent=1, default=str))
    paths["md"].write_text(text)
    try:
        chart(summary, memory, paths["png"], meta)
    except Exception as exc:  # a chart failure must not lose the numbers
        log(f"chart failed: {exc!r}")
    for ext, p in paths.items():
        if p.exists():
            shutil.copyfile(p, outdir / f"latest.{ext}")
    print(text, flush=True)
    log(f"results: {', '.join(str(p) for p in paths.values())} (and latest.*)")

    bad_runs = [r for r in results if not run_complete(r)]
    expected = {(c.key, k) for c in a.cell_list for k in run_keys(a.client_list, a.transport_list, c)}
    missing = expected - {(r["cell"], r["client_key"]) for r in results}
    for r in bad_runs:
        log(f"incomplete: {r['cell']} round {r['round']} {r['client_key']}: ok {r.get('ok')} of {r.get('n')}, "
            f"rc {r.get('rc')}: {r.get('first_error') or (r.get('stderr_tail') or '')[-200:]}")
    if missing:
        log(f"no result for {sorted(missing)}")
    extras_ok = all(m.get("ok") == m.get("n") and m.get("rc") == 0 for m in memory.values()) and \
        all(r.get("failed") == 0 for r in resize.values()) and not latency.get("error")
    # An alternative failing requests (say httpx's h2 LocalProtocolError) is a finding, shown in the
    # tables; fetchpool failing one, or a run not happening at all, is a failed benchmark.
    if missing or not extras_ok or any(split_key(r["client_key"])[0] in FETCHPOOL for r in bad_runs) or \
            any(r.get("rc") not in (0, 3) for r in bad_runs):
        log("the benchmark is incomplete or fetchpool failed requests (see the 'failed' columns)")
        return 1
    return 0


def run_complete(r: dict[str, Any]) -> bool:
    """Every request of the run answered with the right body (wrk: no wrong answer, no socket error)."""
    if r.get("rc") != 0 or r.get("bad") or r.get("errors"):
        return False
    return r.get("client_key") == "wrk" or r.get("ok") == r.get("n")

