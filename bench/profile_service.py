"""``python -m bench.profile_service``: the service's CPU per fetch, and where it goes.

    python -m bench.profile_service                     # h2/2KB, FetchMany of 5,000 URLs, C=100, 5 runs + a profile
    python -m bench.profile_service --reps 3 --no-profile --transport curl
    git archive main service | tar -x -C /tmp/main && \\
        python -m bench.profile_service --baseline-src /tmp/main/service     # this code against main's
    python -m bench.profile_service --transport curl --baseline-src /tmp/main/service --baseline-transport curl

Each run starts a fresh ``fetchpool serve`` (as ``make bench`` does), sends one FetchMany of N
distinct URLs with concurrency C through a real gRPC caller, and counts the service process's CPU
(user + system, all threads, from /proc) per fetch. With ``--baseline-src`` every round runs a
service from that source tree (its ``PYTHONPATH``) and one from this one, in alternating order,
and the ratio is taken per round (the median of those is the figure: both saw the same load).
Then, unless ``--no-profile``, one more run of each under py-spy (``bench.extra.profile_run``):
the top self and inclusive entries, and the inclusive share of the layers named in ``LAYERS``.
Prints markdown on stdout and writes it with the raw data to ``--out``
(bench/results/profile-<stamp>.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.extra import _frame_name, profile_run
from bench.infra import BENCH, Env, Workspace, log
from bench.matrix import Cell, Runner, default_transport, run_key

#: Inclusive share of these layers (a sample counts once per layer whose marker is in its stack).
LAYERS = {
    "httpx cookies (Cookies, http.cookiejar)": ("http/cookiejar.py", "_models.py:Cookies", "_client.py:_merge_cookies"),
    "httpx URL parsing (_urlparse, URL)": ("httpx/_urlparse.py", "httpx/_urls.py"),
    "httpx Client (send, auth, redirects, hooks)": ("httpx/_client.py",),
    "httpcore + h2 + hpack (the HTTP/2 stack)": ("httpcore/", "h2/", "hpack/", "hyperframe/"),
    "fetchpool engine": ("fetchpool/engine/",),
    "fetchpool server + gRPC": ("fetchpool/server/", "grpc/"),
    "shielded clean-up (a task per call)": ("shield.py:shielded",),
    "asyncio / uvloop": ("asyncio/", "uvloop/"),
}
CURRENT, BASELINE = "this code", "baseline"


def layer_shares(raw: Path) -> dict[str, float]:
    """Inclusive percentage of samples per :data:`LAYERS` entry, from py-spy's raw output."""
    counts = dict.fromkeys(LAYERS, 0)
    total = 0
    if not raw.exists():
        return {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames or any("_find_and_load" in f for f in frames):
            continue
        total += int(count)
        for layer, markers in LAYERS.items():
            if any(marker in frame for frame in frames for marker in markers):
                counts[layer] += int(count)
    return {layer: round(100 * n / total, 1) for layer, n in counts.items()} if total else {}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_service", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell", default="h2/2KB", help="scenario/size, as in python -m bench (h2/2KB)")
    ap.add_argument("-n", "--n", type=int, default=5000, help="URLs per FetchMany (5000)")
    ap.add_argument("-c", "--c", type=int, default=100, help="FetchMany concurrency (100)")
    ap.add_argument("--reps", type=int, default=5, help="measured rounds, each on fresh services (5)")
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy runs")
    ap.add_argument("--transport", default=None,
                    help="this code's fetchpool serve transport (its default); the baseline runs on its own default")
    ap.add_argument("--baseline-src", default="",
                    help="a source tree's service/ folder to measure against, round by round (PYTHONPATH)")
    ap.add_argument("--baseline-transport", default="",
                    help="the baseline's transport (FETCHPOOL_TRANSPORT; default: its own default), e.g. curl to "
                         "compare one transport's code before and after a change")
    ap.add_argument("--out", default=str(BENCH / "results"))
    return ap.parse_args(argv)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    transport = a.transport or default_transport()
    baseline_env = {"PYTHONPATH": a.baseline_src} | (
        {"FETCHPOOL_TRANSPORT": a.baseline_transport} if a.baseline_transport else {})
    versions = {CURRENT: {}} | ({BASELINE: baseline_env} if a.baseline_src else {})
    cell = Cell(*a.cell.split("/"))
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ws = Workspace.create()
    env = Env(ws, batch_concurrency=a.c)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in versions}
    profiles: dict[str, Any] = {}
    try:
        env.start()
        runner = Runner(env, ws, n=a.n, c=a.c, wrk_secs=1, req_timeout=30, proc_timeout=600)
        for rep in range(1, a.reps + 1):
            for name in list(versions) if rep % 2 else list(versions)[::-1]:
                env.service_env = versions[name]
                log(f"round {rep}: {name}")
                # The baseline runs on its own default transport (its serve may have no --transport),
                # or on the one --baseline-transport names, through the environment.
                key = run_key("fp-many", transport) if name == CURRENT else "fp-many"
                runs[name].append(runner.run(key, cell, rep))
        for name in versions if not a.no_profile else ():
            env.service_env = versions[name]
            profile = profile_run(env, ws, cell=cell, n=a.n, c=a.c, outdir=outdir, stamp=f"{stamp}-{name[:4]}",
                                  transport=transport if name == CURRENT else None)
            profile["layers"] = layer_shares(Path(profile["raw_files"][0])) if profile.get("raw_files") else {}
            profiles[name] = profile
    finally:
        env.close()
        ws.close()
    per_fetch = {name: [r["cpu_ms_per_1k"] / 1000 if r.get("cpu_ms_per_1k") and r.get("ok") == a.n else None
                        for r in rs] for name, rs in runs.items()}
    ratios = [c / b for c, b in zip(per_fetch[CURRENT], per_fetch.get(BASELINE, []), strict=False) if c and b]
    result = {"cell": cell.key, "n": a.n, "c": a.c, "transport": transport, "baseline_src": a.baseline_src,
              "baseline_transport": a.baseline_transport or "its default",
              "cpu_ms_per_fetch": per_fetch,
              "median": {name: _median([v for v in vs if v]) for name, vs in per_fetch.items()},
              "ratio_per_round": ratios, "ratio_median": _median(ratios),
              "rps": {name: [r.get("rps") for r in rs] for name, rs in runs.items()},
              "failed_runs": sum(v is None for vs in per_fetch.values() for v in vs), "profiles": profiles}
    text = render(result)
    (outdir / f"profile-{stamp}.json").write_text(json.dumps(result, indent=1, default=str))
    (outdir / f"profile-{stamp}.md").write_text(text)
    print(text, flush=True)
    log(f"results: {outdir / f'profile-{stamp}.md'}")
    return 0 if not result["failed_runs"] else 1


def render(result: dict[str, Any]) -> str:
    baseline = (f"; baseline: the service from {result['baseline_src']} on {result['baseline_transport']} transport, "
                "alternating with this code round by round") if result["baseline_src"] else ""
    lines = [f"# Service CPU per fetch, {result['cell']}\n",
             f"- one FetchMany of {result['n']:,} URLs, concurrency {result['c']}, transport {result['transport']}, "
             f"a fresh `fetchpool serve` per run{baseline}"]
    for name, values in result["cpu_ms_per_fetch"].items():
        shown = ", ".join(f"{v:.3f}" if v else "failed" for v in values)
        lines.append(f"- {name}: service CPU ms per fetch per round {shown}; "
                     f"**median {result['median'][name] or 0:.3f}**; req/s {result['rps'][name]}")
    if result["ratio_median"] is not None:
        lines.append(f"- this code ÷ baseline, per round: {', '.join(f'{r:.2f}' for r in result['ratio_per_round'])}; "
                     f"**median {result['ratio_median']:.2f}**")
    for name, profile in result["profiles"].items():
        service = profile.get("service") or {}
        if not service:
            continue
        lines.append(f"\n## py-spy, {name} ({service.get('samples')} samples holding the GIL, "
                     f"{profile.get('rps')} req/s under the profiler)\n")
        lines.append("| layer (inclusive) | % |\n|---|---|")
        lines += [f"| {layer} | {share} |" for layer, share in (profile.get("layers") or {}).items()]
        lines.append("\n| % self | file:function |\n|---|---|")
        lines += [f"| {share} | `{name}` |" for name, share in (service.get("self") or [])[:15]]
        lines.append("\n| % inclusive | file:function |\n|---|---|")
        lines += [f"| {share} | `{name}` |" for name, share in (service.get("inclusive") or [])[:20]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
