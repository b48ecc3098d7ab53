"""Aggregation (medians, per-round ratios), the goals, and the outputs: markdown table, JSON, PNG."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.matrix import CLIENT_LABELS, FETCHPOOL, LATENCY, SCENARIOS

Row = dict[str, Any]


def med(values: Iterable[Any]) -> float | None:
    v = [x for x in values if isinstance(x, int | float)]
    return statistics.median(v) if v else None


def fmt(x: float | None, nd: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{nd}f}"


def by_cell(results: list[Row]) -> dict[str, dict[str, list[Row]]]:
    groups: dict[str, dict[str, list[Row]]] = {}
    for r in results:
        groups.setdefault(r["cell"], {}).setdefault(r["client_key"], []).append(r)
    return groups


def round_ratio(num: list[Row], den: list[Row], field: str = "rps", invert: bool = False) -> float | None:
    """Median over rounds of num[field] / den[field], each pair from the same round."""
    dens = {r["round"]: r.get(field) for r in den}
    vals = []
    for r in num:
        a, b = r.get(field), dens.get(r["round"])
        if a and b:
            vals.append(b / a if invert else a / b)
    return med(vals)


def failed(rows: list[Row]) -> int:
    return sum((r.get("errors") or 0) + (r.get("bad") or 0) for r in rows) + \
        sum(1 for r in rows if r.get("rc") not in (0, None) and not (r.get("errors") or r.get("bad")))


def summarize(results: list[Row]) -> dict[str, Any]:
    """Per cell: per client medians, and the key ratios."""
    out: dict[str, Any] = {}
    for cell, g in by_cell(results).items():
        clients = {}
        for key, rows in g.items():
            rps = [r["rps"] for r in rows if r.get("rps")]
            clients[key] = {
                "label": CLIENT_LABELS.get(key, key),
                "rounds": len(rows),
                "rps_median": med(rps),
                "rps_min": min(rps) if rps else None,
                "rps_max": max(rps) if rps else None,
                "p50_ms": med(r.get("p50_ms") for r in rows),
                "p99_ms": med(r.get("p99_ms") for r in rows),
                "cpu_ms_per_1k": med(r.get("cpu_ms_per_1k") for r in rows),
                "peak_rss_mb": med(r.get("peak_rss_mb") for r in rows),
                "caller_cpu_ms_per_1k": med(r.get("caller_cpu_ms_per_1k") for r in rows),
                "caller_peak_rss_mb": med(r.get("maxrss_mb") for r in rows) if key in FETCHPOOL else None,
                "requests": sum(r.get("n") or 0 for r in rows),
                "ok": sum(r.get("ok") or 0 for r in rows),
                "failed": failed(rows),
                "proto": sorted({p for r in rows for p in (r.get("proto") or {})}),
                "fm_over": round_ratio(g["fp-many"], rows) if "fp-many" in g else None,
                "fs_over": round_ratio(g["fp-stream"], rows) if "fp-stream" in g else None,
            }
        ratios: dict[str, float | None] = {}
        for fp, tag in (("fp-many", "FM"), ("fp-stream", "FS")):
            if fp not in g:
                continue
            for other in ("httpx", "aiohttp", "unpooled", "httpx2", "wrk"):
                if other in g:
                    ratios[f"{tag}/{other}"] = round_ratio(g[fp], g[other])
            if "httpx" in g:
                ratios[f"{tag} cpu/httpx cpu"] = round_ratio(g[fp], g["httpx"], "cpu_ms_per_1k")
        if "httpx2" in g and "httpx" in g:
            ratios["httpx2/httpx"] = round_ratio(g["httpx2"], g["httpx"])
        out[cell] = {"clients": clients, "ratios": ratios}
    return out


def goals(summary: dict[str, Any], memory: Row | None, resize: Row | None) -> list[Row]:
    """Each goal per cell with the FetchMany and FetchStream values and PASS/MISS."""
    rows: list[Row] = []

    def add(goal: str, cell: str, target: str, ok: Callable[[float], bool], fm: float | None,
            fs: float | None) -> None:
        vals = [v for v in (fm, fs) if v is not None]
        if not vals:
            verdict = "n/a"
        else:
            misses = [tag for tag, v in (("FetchMany", fm), ("FetchStream", fs)) if v is not None and not ok(v)]
            verdict = "PASS" if not misses else f"MISS ({', '.join(misses)})"
        rows.append({"goal": goal, "cell": cell, "target": target, "fetchmany": fm, "fetchstream": fs,
                     "verdict": verdict})

    for cell, s in summary.items():
        r = s["ratios"]
        if "FM/httpx" in r:
            add("throughput vs in-process pooled httpx", cell, ">= 1.0x", lambda v: v >= 1.0, r.get("FM/httpx"),
                r.get("FS/httpx"))
        if "FM/aiohttp" in r:
            add("throughput vs in-process aiohttp", cell, ">= 0.5x", lambda v: v >= 0.5, r.get("FM/aiohttp"),
                r.get("FS/aiohttp"))
        if cell.split("/")[0] in LATENCY and "FM/unpooled" in r:
            add("~50 ms RTT: throughput vs unpooled", cell, ">= 2.5x", lambda v: v >= 2.5, r.get("FM/unpooled"),
                r.get("FS/unpooled"))
        if "FM cpu/httpx cpu" in r:
            add("service CPU per 1k vs pooled httpx script", cell, "<= 1.3x", lambda v: v <= 1.3,
                r.get("FM cpu/httpx cpu"), r.get("FS cpu/httpx cpu"))
    if memory:
        g = memory.get("rss_growth_mb")
        complete = memory.get("ok") == memory.get("n")
        rows.append({"goal": f"{memory['n']:,}-URL FetchMany: service RSS growth", "cell": memory.get("cell"),
                     "target": "< 50 MB", "fetchmany": g, "fetchstream": None,
                     "verdict": "n/a" if g is None else ("PASS" if g < 50 and complete else
                                                         "MISS" + ("" if complete else " (incomplete)"))})
    if resize:
        f = resize.get("failed")
        rows.append({"goal": "resize under load: failed requests", "cell": "h1+h2 mixed", "target": "= 0",
                     "fetchmany": None, "fetchstream": f,
                     "verdict": "n/a" if f is None else ("PASS" if f == 0 and resize.get("ok") else "MISS")})
    return rows


# --------------------------------------------------------------------------- markdown
def _cell_title(cell: str) -> str:
    scenario, size = cell.split("/")
    return f"{SCENARIOS.get(scenario, scenario)} - {size} page"


def render(meta: Row, summary: dict[str, Any], goal_rows: list[Row], memory: Row | None, resize: Row | None,
           profiles: list[Row], latency_info: Row | None, results: list[Row] | None = None) -> str:
    L: list[str] = []
    L.append(f"# fetchpool benchmark ({'smoke' if meta.get('smoke') else 'full'} run, {meta['finished']})\n")
    L.append(f"**Machine: {meta['cores']} cores** ({meta['cpu_model']}), kernel {meta['kernel']}, "
             f"{meta['python']}. loadavg during the run: {meta['load']}.")
    L.append("**These figures are ratios from one run on a shared, noisy machine**: client, service, nginx and "
             "proxy compete for the same cores. Trust the side-by-side ratios (each taken within one round, "
             "minutes apart at most, then the median over rounds) more than absolute req/s.\n")
    L.append(f"- work: N={meta['n']} distinct URLs per run (`?i=k&r=<run>`), C={meta['c']} in flight, "
             f"{meta['rounds']} round{'s' if meta['rounds'] != 1 else ''}, client order shuffled per round "
             "(A B A B); every body checked against the page (wrong answers are never counted as ok); "
             "each client a process of its own.")
    code = meta.get("code") or {}
    L.append(f"- fetchpool measured: commit {code.get('head')}, uncommitted changes in service/: "
             f"{code.get('service_uncommitted')}, sources sha256 {code.get('sources_sha256')}"
             + (" - **WARNING: service/ changed while the benchmark ran; rerun it**"
                if meta.get("code_changed_during_run") else ""))
    L.append(f"- versions: {meta['versions']}")
    L.append(f"- servers: nginx (1 worker, access log off, TLS 1.2/1.3, h2) and {meta['proxy']} as the forward "
             "proxy (CONNECT). The fetchpool service is started fresh for each fetchpool run "
             f"(`fetchpool serve --batch-concurrency {meta['c']}`, defaults otherwise: 100 connections per pool), "
             "so every contender starts cold.")
    if latency_info:
        L.append(f"- latency: {latency_info.get('method')}; measured TCP connect to the origin "
                 f"{latency_info.get('tcp_connect_rtt_ms_origin')} ms, to an undelayed port "
                 f"{latency_info.get('tcp_connect_rtt_ms_undelayed_port')} ms.")
    L.append(
        "- columns: req/s = median (min-max) over rounds of ok responses / the client's timed window; "
        "**FM ÷ it, FS ÷ it** = fetchpool FetchMany (FM) / FetchStream (FS) req/s divided by this row's, "
        "per round, median (>= 1 means fetchpool is faster); p50/p99 = per-request latency "
        "(FetchMany: the service's per-fetch total, since the whole batch is sent at once; others: "
        "request start to body read, caller side); CPU ms/1k = CPU of the fetching process in its timed "
        "window per 1,000 ok requests (fetchpool: the **service** process; its gRPC caller in the caller "
        "column); peak RSS = VmHWM of that process (wrk: C, not Python).\n"
    )

    L.append("## Key ratios (median of per-round ratios)\n")
    L.append("| cell | FM ÷ httpx | FS ÷ httpx | FM ÷ aiohttp | FS ÷ aiohttp | FM ÷ unpooled | FS ÷ unpooled | "
             "FM ÷ wrk | svc CPU ÷ httpx CPU (FM / FS) | httpx2 ÷ httpx |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for cell, s in summary.items():
        r = s["ratios"]
        L.append(f"| {cell} | {fmt(r.get('FM/httpx'), 2)} | {fmt(r.get('FS/httpx'), 2)} | "
                 f"{fmt(r.get('FM/aiohttp'), 2)} | {fmt(r.get('FS/aiohttp'), 2)} | {fmt(r.get('FM/unpooled'), 2)} | "
                 f"{fmt(r.get('FS/unpooled'), 2)} | {fmt(r.get('FM/wrk'), 3)} | "
                 f"{fmt(r.get('FM cpu/httpx cpu'), 2)} / {fmt(r.get('FS cpu/httpx cpu'), 2)} | "
                 f"{fmt(r.get('httpx2/httpx'), 2)} |")
    L.append("")

    L.append("## Goals\n")
    L.append("| goal | cell | target | FetchMany | FetchStream | verdict |")
    L.append("|---|---|---|---|---|---|")
    for g in goal_rows:
        nd = 1 if "RSS" in g["goal"] else (0 if "failed" in g["goal"] else 2)
        L.append(f"| {g['goal']} | {g['cell']} | {g['target']} | {fmt(g['fetchmany'], nd)} | "
                 f"{fmt(g['fetchstream'], nd)} | **{g['verdict']}** |")
    passed = sum(1 for g in goal_rows if g["verdict"] == "PASS")
    L.append(f"\n{passed} of {len(goal_rows)} goal checks PASS; goals are targets for the numbers, not timed "
             "tests: a MISS is reported, never an error.\n")

    L.append("## Per scenario\n")
    for cell, s in summary.items():
        L.append(f"### {cell}: {_cell_title(cell)}\n")
        L.append("| client | req/s (min-max) | FM ÷ it | FS ÷ it | p50 ms | p99 ms | CPU ms/1k | peak RSS MB | "
                 "caller CPU ms/1k | caller RSS MB | proto | failed |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        order = [k for k in CLIENT_LABELS if k in s["clients"]]
        for k in order:
            c = s["clients"][k]
            L.append(f"| {c['label']} | {fmt(c['rps_median'])} ({fmt(c['rps_min'])}-{fmt(c['rps_max'])}) | "
                     f"{fmt(c['fm_over'], 2)} | {fmt(c['fs_over'], 2)} | {fmt(c['p50_ms'], 1)} | "
                     f"{fmt(c['p99_ms'], 1)} | {fmt(c['cpu_ms_per_1k'])} | {fmt(c['peak_rss_mb'], 1)} | "
                     f"{fmt(c['caller_cpu_ms_per_1k'])} | {fmt(c['caller_peak_rss_mb'], 1)} | "
                     f"{'/'.join(c['proto']) or '-'} | {c['failed']} |")
        L.append("")

    failures = [r for r in results or [] if (r.get("errors") or r.get("bad") or r.get("rc") not in (0, None))]
    if failures:
        L.append("## Runs with failed requests\n")
        L.append("| cell | round | client | ok | failed | first error |")
        L.append("|---|---|---|---|---|---|")
        for r in failures:
            why = (r.get("first_error") or (r.get("stderr_tail") or "")[-200:] or f"exit {r.get('rc')}")
            why = why.replace("|", "/").replace("\n", " ")
            L.append(f"| {r['cell']} | {r['round']} | {r['client_key']} | {r.get('ok')} | "
                     f"{(r.get('errors') or 0) + (r.get('bad') or 0)} | {why} |")
        L.append("")
    if memory:
        L.append("## 100,000-URL FetchMany: service RSS over time\n" if memory.get("n") == 100_000 else
                 f"## {memory.get('n'):,}-URL FetchMany: service RSS over time\n")
        L.append(f"- {memory.get('cell')}, concurrency {memory.get('c')}: ok {memory.get('ok')} of {memory.get('n')}, "
                 f"failed {(memory.get('errors') or 0) + (memory.get('bad') or 0)}, {fmt(memory.get('rps'))} req/s, "
                 f"{fmt(memory.get('wall_s'), 1)} s")
        L.append(f"- service RSS: {memory.get('rss_mb_started')} MB at start, {memory.get('rss_mb_baseline')} MB "
                 f"after a {memory.get('warmup')}-URL warm-up (baseline), max {memory.get('rss_mb_max')} MB during "
                 f"the batch: **growth {memory.get('rss_growth_mb')} MB**; last fifth vs second fifth of the run: "
                 f"{memory.get('rss_drift_mb')} MB, slope over the second half "
                 f"{memory.get('rss_slope_mb_per_10k')} MB per 10,000 requests (flat ~ 0). "
                 f"Caller peak RSS {memory.get('caller_peak_rss_mb')} MB (it holds the whole batch).")
        samples = memory.get("samples") or []
        if samples:
            step = max(1, len(samples) // 12)
            picks = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
            L.append("\n| t s | requests done | service RSS MB | caller RSS MB |")
            L.append("|---|---|---|---|")
            for t, rss, caller, done in picks:
                L.append(f"| {t:.0f} | {fmt(done)} | {rss:.1f} | {fmt(caller, 1)} |")
        L.append("")
    if resize:
        L.append("## Resize under load\n")
        L.append(f"- {resize.get('secs'):g} s of FetchStream load (C={resize.get('c')}) over "
                 f"{', '.join(resize['cells'])}, "
                 f"pool limits changed every {resize.get('every'):g} s through PoolAdmin.SetPoolLimits "
                 f"({resize.get('resizes')} changes, cycling max_connections 100->4->50->1->20->2->64->8->30->100 with "
                 f"keep-alive and per-host caps; {len(resize.get('resize_failures') or [])} SetPoolLimits errors).")
        L.append(f"- requests sent {resize.get('n')}, ok {resize.get('ok')}, **failed {resize.get('failed')}**, "
                 f"{fmt(resize.get('rps'))} req/s, p50 {fmt(resize.get('p50_ms'), 1)} ms, "
                 f"p99 {fmt(resize.get('p99_ms'), 1)} ms" + (f"; first error: {resize['first_error']}"
                                                             if resize.get("first_error") else ""))
        L.append("")
    for profile in profiles:
        L.append(f"## Profile of the service (py-spy), {profile.get('cell')}\n")
        if profile.get("error"):
            L.append(f"- not run: {profile['error']}\n")
        else:
            if profile.get("invalid"):
                L.append(f"- **INVALID**: {profile['invalid']}")
            L.append(f"- {profile.get('tool')}; one FetchMany of {profile.get('n')} URLs, {profile.get('cell')}, "
                     f"{fmt(profile.get('rps'))} req/s under the profiler. Raw stacks: "
                     f"{', '.join(Path(p).name for p in profile.get('raw_files', []))}.")
            threads = profile.get("threads") or []
            if threads:
                total = sum(t["cpu_s"] for t in threads) or 1
                L.append("\nService CPU by thread during the profiled batch (from /proc; the main thread runs "
                         "the asyncio loop, the others are gRPC's C-core and executor threads):\n")
                L.append("| thread | CPU s | share |")
                L.append("|---|---|---|")
                for t in threads[:8]:
                    label = f"{t['name']} (main: event loop)" if t["main"] else f"{t['name']} (tid {t['tid']})"
                    L.append(f"| {label} | {t['cpu_s']:.2f} | {100 * t['cpu_s'] / total:.0f}% |")
            for who in ("service", "caller"):
                p = profile.get(who) or {}
                L.append(f"\n**{who}** ({p.get('samples', 0)} samples holding the GIL). Top self time:\n")
                L.append("| % self | file:function |")
                L.append("|---|---|")
                for name, share in (p.get("self") or [])[:15]:
                    L.append(f"| {share} | `{name}` |")
                packages = p.get("self_by_package") or []
                if packages:
                    L.append("\nSelf time by package: " + ", ".join(f"{name} {share}%" for name, share in packages))
                L.append("\nTop inclusive time:\n")
                L.append("| % incl | file:function |")
                L.append("|---|---|")
                for name, share in (p.get("inclusive") or [])[:20]:
                    L.append(f"| {share} | `{name}` |")
            L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------- chart
def chart(summary: dict[str, Any], memory: Row | None, path: Path, meta: Row) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(summary)
    keys = [k for k in CLIENT_LABELS if any(k in summary[c]["clients"] for c in cells)]
    panels = 2 if memory and memory.get("samples") else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(10, 1.6 * len(cells) + 4), 5.5 * panels), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(keys))
    colors = plt.get_cmap("tab10")
    for i, k in enumerate(keys):
        xs, ys = [], []
        for j, c in enumerate(cells):
            v = summary[c]["clients"].get(k, {}).get("rps_median")
            if v:
                xs.append(j + (i - (len(keys) - 1) / 2) * width)
                ys.append(v)
        ax.bar(xs, ys, width=width, label=CLIENT_LABELS[k], color=colors(i))
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels(cells, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (median over rounds, log scale)")
    ax.set_title(f"Throughput per scenario and client - {meta['cores']} cores, one run on a shared machine "
                 f"(N={meta['n']}, C={meta['c']})")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=3)
    ax.grid(axis="y", which="both", alpha=0.3)
    if panels == 2 and memory:
        ax2 = axes[1][0]
        s = memory["samples"]
        xs = [row[3] if row[3] is not None else 0 for row in s]
        ax2.plot(xs, [row[1] for row in s], label="service RSS (MB)")
        if any(row[2] for row in s):
            ax2.plot([x for x, row in zip(xs, s, strict=True) if row[2]], [row[2] for row in s if row[2]],
                     label="gRPC caller RSS (MB)")
        if memory.get("rss_mb_baseline"):
            ax2.axhline(memory["rss_mb_baseline"] + 50, color="red", linestyle="--", label="baseline + 50 MB (goal)")
        ax2.set_xlabel("requests done")
        ax2.set_ylabel("RSS MB")
        ax2.set_ylim(bottom=0)
        ax2.set_title(f"{memory['n']:,}-URL FetchMany ({memory.get('cell')}): RSS over the batch")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
