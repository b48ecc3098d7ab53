"""The benchmark's outputs: the markdown report and the PNG chart (from ``bench.report``'s summary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.matrix import CLIENT_LABELS, FETCHPOOL, SCENARIOS, label, run_key
from bench.report import Row, fmt

RESIZE_CYCLE = "max_connections 100->4->50->1->20->2->64->8->30->100 with keep-alive, per-host and max_requests caps"


def _cell_title(cell: str) -> str:
    scenario, size = cell.split("/")
    return f"{SCENARIOS.get(scenario, scenario)} - {size} page"


def _order(keys: Any, transports: list[str]) -> list[str]:
    """Run keys in the table's order: the clients' order, fetchpool's runs per transport."""
    wanted = [run_key(k, t) for k in CLIENT_LABELS for t in (transports if k in FETCHPOOL else [""])]
    return [k for k in wanted if k in keys]


def _head(meta: Row, latency_info: Row | None) -> list[str]:
    L = [f"# fetchpool benchmark ({'smoke' if meta.get('smoke') else 'full'} run, {meta['finished']})\n",
         f"**Machine: {meta['cores']} cores** ({meta['cpu_model']}), kernel {meta['kernel']}, "
         f"{meta['python']}. loadavg during the run: {meta['load']}.",
         "**These figures are ratios from one run on a shared, noisy machine**: client, service, nginx and "
         "proxy compete for the same cores. Trust the side-by-side ratios (each taken within one round, "
         "minutes apart at most, then the median over rounds) more than absolute req/s.\n",
         f"- work: N={meta['n']} distinct URLs per run (`?i=k&r=<run>`), C={meta['c']} in flight "
         f"(lat500-h2: N={meta.get('wide_n')}, C={meta.get('wide_c')}, fetchpool, pooled httpx and aiohttp only), "
         f"{meta['rounds']} round{'s' if meta['rounds'] != 1 else ''}, client order shuffled per round "
         "(A B A B); every body checked against the page (wrong answers are never counted as ok); "
         "each client a process of its own."]
    code = meta.get("code") or {}
    L.append(f"- fetchpool measured: commit {code.get('head')}, uncommitted changes in service/: "
             f"{code.get('service_uncommitted')}, sources sha256 {code.get('sources_sha256')}"
             + (" - **WARNING: service/ changed while the benchmark ran; rerun it**"
                if meta.get("code_changed_during_run") else ""))
    L.append(f"- fetchpool transports: {', '.join(meta.get('transports') or [])}, each run on every cell; the "
             f"default (`fetchpool serve` without `--transport`) is **{meta.get('default_transport')}**, whose "
             "runs the goals judge.")
    L.append(f"- versions: {meta['versions']}")
    L.append(f"- servers: nginx (1 worker, access log off, TLS 1.2/1.3, h2) and {meta['proxy']} as the forward "
             "proxy (CONNECT). The fetchpool service is started fresh for each fetchpool run "
             "(`fetchpool serve --batch-concurrency C`, defaults otherwise: 100 connections per pool), "
             "so every contender starts cold.")
    if latency_info:
        L.append(f"- latency: {latency_info.get('method')}; measured TCP connect to the origin "
                 f"{latency_info.get('tcp_connect_rtt_ms_origin')} ms, to an undelayed port "
                 f"{latency_info.get('tcp_connect_rtt_ms_undelayed_port')} ms.")
    L.append(
        "- columns: req/s = median (min-max) over rounds of ok responses / the client's timed window; "
        "**FM ÷ it, FS ÷ it** = fetchpool FetchManyPacked (FM) / FetchStreamPacked (FS) req/s on the default "
        "transport divided by this row's, per round, median (>= 1 means fetchpool is faster); p50/p99 = per-request "
        "latency (FM: the service's per-fetch total, since the whole batch is sent at once; others: "
        "request start to body read, caller side); CPU ms/1k = CPU of the fetching process in its timed "
        "window per 1,000 ok requests (fetchpool: the **service** process; its gRPC caller in the caller "
        "column); peak RSS = VmHWM of that process (wrk: C, not Python).\n"
    )
    return L


def _key_ratios(summary: dict[str, Any]) -> list[str]:
    L = ["## Key ratios (median of per-round ratios)\n",
         "| cell | transport | FM ÷ httpx | FS ÷ httpx | FM ÷ aiohttp | FS ÷ aiohttp | FM ÷ unpooled | FS ÷ unpooled | "
         "FM ÷ wrk | svc CPU ÷ httpx CPU (FM / FS) | svc CPU ÷ httpcore svc CPU (FM / FS) | httpx2 ÷ httpx |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell, s in summary.items():
        for transport, r in s["ratios"].items():
            L.append(f"| {cell} | {transport} | {fmt(r.get('FM/httpx'), 2)} | {fmt(r.get('FS/httpx'), 2)} | "
                     f"{fmt(r.get('FM/aiohttp'), 2)} | {fmt(r.get('FS/aiohttp'), 2)} | "
                     f"{fmt(r.get('FM/unpooled'), 2)} | {fmt(r.get('FS/unpooled'), 2)} | {fmt(r.get('FM/wrk'), 3)} | "
                     f"{fmt(r.get('FM cpu/httpx cpu'), 2)} / {fmt(r.get('FS cpu/httpx cpu'), 2)} | "
                     f"{fmt(r.get('FM cpu/ref cpu'), 2)} / {fmt(r.get('FS cpu/ref cpu'), 2)} | "
                     f"{fmt(s.get('httpx2/httpx'), 2)} |")
    return [*L, ""]


def _goals(goal_rows: list[Row]) -> list[str]:
    L = ["## Goals\n", "| goal | cell | transport | target | FM | FS | verdict |",
         "|---|---|---|---|---|---|---|"]
    for g in goal_rows:
        nd = 1 if "RSS" in g["goal"] else (0 if "failed" in g["goal"] else 2)
        L.append(f"| {g['goal']} | {g['cell']} | {g['transport']} | {g['target']} | {fmt(g['fetchmany'], nd)} | "
                 f"{fmt(g['fetchstream'], nd)} | **{g['verdict']}** |")
    per_transport = "; ".join(
        f"{t}: {sum(g['verdict'] == 'PASS' for g in goal_rows if g['transport'] == t)} of "
        f"{sum(g['transport'] == t for g in goal_rows)}" for t in dict.fromkeys(g["transport"] for g in goal_rows))
    L.append(f"\nGoal checks PASS per transport ({per_transport}; the first is the default, whose goals issue 15 "
             "sets); goals are targets for the numbers, not timed tests: a MISS is reported, never an error.\n")
    return L


def _per_scenario(summary: dict[str, Any], default: str) -> list[str]:
    L = ["## Per scenario\n"]
    for cell, s in summary.items():
        L.append(f"### {cell}: {_cell_title(cell)}\n")
        L.append("| client | req/s (min-max) | FM ÷ it | FS ÷ it | p50 ms | p99 ms | CPU ms/1k | peak RSS MB | "
                 "caller CPU ms/1k | caller RSS MB | proto | failed |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for k in _order(s["clients"], list(s["ratios"])):
            c = s["clients"][k]
            L.append(f"| {c['label']} | {fmt(c['rps_median'])} ({fmt(c['rps_min'])}-{fmt(c['rps_max'])}) | "
                     f"{fmt(c['fm_over'].get(default), 2)} | {fmt(c['fs_over'].get(default), 2)} | "
                     f"{fmt(c['p50_ms'], 1)} | {fmt(c['p99_ms'], 1)} | {fmt(c['cpu_ms_per_1k'])} | "
                     f"{fmt(c['peak_rss_mb'], 1)} | {fmt(c['caller_cpu_ms_per_1k'])} | "
                     f"{fmt(c['caller_peak_rss_mb'], 1)} | {'/'.join(c['proto']) or '-'} | {c['failed']} |")
        L.append("")
    return L


def _failures(results: list[Row]) -> list[str]:
    failures = [r for r in results if (r.get("errors") or r.get("bad") or r.get("rc") not in (0, None))]
    if not failures:
        return []
    L = ["## Runs with failed requests\n", "| cell | round | client | ok | failed | first error |",
         "|---|---|---|---|---|---|"]
    for r in failures:
        why = (r.get("first_error") or (r.get("stderr_tail") or "")[-200:] or f"exit {r.get('rc')}")
        why = why.replace("|", "/").replace("\n", " ")
        L.append(f"| {r['cell']} | {r['round']} | {r['client_key']} | {r.get('ok')} | "
                 f"{(r.get('errors') or 0) + (r.get('bad') or 0)} | {why} |")
    return [*L, ""]


def _memory(transport: str, memory: Row) -> list[str]:
    L = [f"## {memory.get('n'):,}-URL FetchMany ({transport}): service RSS over time\n",
         f"- {memory.get('cell')}, concurrency {memory.get('c')}: ok {memory.get('ok')} of {memory.get('n')}, "
         f"failed {(memory.get('errors') or 0) + (memory.get('bad') or 0)}, {fmt(memory.get('rps'))} req/s, "
         f"{fmt(memory.get('wall_s'), 1)} s",
         f"- service RSS: {memory.get('rss_mb_started')} MB at start, {memory.get('rss_mb_baseline')} MB "
         f"after a {memory.get('warmup')}-URL warm-up (baseline), max {memory.get('rss_mb_max')} MB during "
         f"the batch: **growth {memory.get('rss_growth_mb')} MB**; last fifth vs second fifth of the run: "
         f"{memory.get('rss_drift_mb')} MB, slope over the second half "
         f"{memory.get('rss_slope_mb_per_10k')} MB per 10,000 requests (flat ~ 0). "
         f"Caller peak RSS {memory.get('caller_peak_rss_mb')} MB (it holds the whole batch)."]
    samples = memory.get("samples") or []
    if samples:
        step = max(1, len(samples) // 12)
        picks = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
        L += ["\n| t s | requests done | service RSS MB | caller RSS MB |", "|---|---|---|---|"]
        L += [f"| {t:.0f} | {fmt(done)} | {rss:.1f} | {fmt(caller, 1)} |" for t, rss, caller, done in picks]
    return [*L, ""]


def _resize(transport: str, resize: Row) -> list[str]:
    return [f"## Resize under load ({transport})\n",
            f"- {resize.get('secs'):g} s of FetchStream load (C={resize.get('c')}) over {', '.join(resize['cells'])}, "
            f"pool limits changed every {resize.get('every'):g} s through PoolAdmin.SetPoolLimits "
            f"({resize.get('resizes')} changes, cycling {RESIZE_CYCLE}; "
            f"{len(resize.get('resize_failures') or [])} SetPoolLimits errors).",
            f"- requests sent {resize.get('n')}, ok {resize.get('ok')}, **failed {resize.get('failed')}**, "
            f"{fmt(resize.get('rps'))} req/s, p50 {fmt(resize.get('p50_ms'), 1)} ms, "
            f"p99 {fmt(resize.get('p99_ms'), 1)} ms" + (f"; first error: {resize['first_error']}"
                                                        if resize.get("first_error") else ""), ""]


def _profile(profile: Row) -> list[str]:
    L = [f"## Profile of the service (py-spy), {profile.get('cell')}, {profile.get('transport')}\n"]
    if profile.get("error"):
        return [*L, f"- not run: {profile['error']}\n"]
    if profile.get("invalid"):
        L.append(f"- **INVALID**: {profile['invalid']}")
    L.append(f"- {profile.get('tool')}; one FetchMany of {profile.get('n')} URLs, {profile.get('cell')}, "
             f"{fmt(profile.get('rps'))} req/s under the profiler. Raw stacks: "
             f"{', '.join(Path(p).name for p in profile.get('raw_files', []))}.")
    threads = profile.get("threads") or []
    if threads:
        total = sum(t["cpu_s"] for t in threads) or 1
        L += ["\nService CPU by thread during the profiled batch (from /proc; the main thread runs "
              "the asyncio loop, the others are gRPC's C-core and executor threads):\n", "| thread | CPU s | share |",
              "|---|---|---|"]
        for t in threads[:8]:
            name = f"{t['name']} (main: event loop)" if t["main"] else f"{t['name']} (tid {t['tid']})"
            L.append(f"| {name} | {t['cpu_s']:.2f} | {100 * t['cpu_s'] / total:.0f}% |")
    for who in ("service", "caller"):
        p = profile.get(who) or {}
        L += [f"\n**{who}** ({p.get('samples', 0)} samples holding the GIL). Top self time:\n",
              "| % self | file:function |", "|---|---|"]
        L += [f"| {share} | `{name}` |" for name, share in (p.get("self") or [])[:15]]
        packages = p.get("self_by_package") or []
        if packages:
            L.append("\nSelf time by package: " + ", ".join(f"{name} {share}%" for name, share in packages))
        L += ["\nTop inclusive time:\n", "| % incl | file:function |", "|---|---|"]
        L += [f"| {share} | `{name}` |" for name, share in (p.get("inclusive") or [])[:20]]
    return [*L, ""]


def render(meta: Row, summary: dict[str, Any], goal_rows: list[Row], memory: dict[str, Row],
           resize: dict[str, Row], profiles: list[Row], latency_info: Row | None,
           results: list[Row] | None = None) -> str:
    """The whole markdown report."""
    L = _head(meta, latency_info) + _key_ratios(summary) + _goals(goal_rows)
    L += _per_scenario(summary, meta.get("default_transport", "")) + _failures(results or [])
    for transport, m in memory.items():
        L += _memory(transport, m)
    for transport, z in resize.items():
        L += _resize(transport, z)
    for profile in profiles:
        L += _profile(profile)
    return "\n".join(L)


def chart(summary: dict[str, Any], memory: dict[str, Row], path: Path, meta: Row) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(summary)
    transports = meta.get("transports") or []
    keys = _order({k for c in cells for k in summary[c]["clients"]}, transports)
    shown = memory.get(meta.get("default_transport", "")) or next(iter(memory.values()), None)
    panels = 2 if shown and shown.get("samples") else 1
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
        ax.bar(xs, ys, width=width, label=label(k), color=colors(i % 10))
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels(cells, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (median over rounds, log scale)")
    ax.set_title(f"Throughput per scenario and client - {meta['cores']} cores, one run on a shared machine "
                 f"(N={meta['n']}, C={meta['c']})")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=3)
    ax.grid(axis="y", which="both", alpha=0.3)
    if panels == 2 and shown:
        ax2 = axes[1][0]
        s = shown["samples"]
        xs = [row[3] if row[3] is not None else 0 for row in s]
        ax2.plot(xs, [row[1] for row in s], label="service RSS (MB)")
        if any(row[2] for row in s):
            ax2.plot([x for x, row in zip(xs, s, strict=True) if row[2]], [row[2] for row in s if row[2]],
                     label="gRPC caller RSS (MB)")
        if shown.get("rss_mb_baseline"):
            ax2.axhline(shown["rss_mb_baseline"] + 50, color="red", linestyle="--", label="baseline + 50 MB (goal)")
        ax2.set_xlabel("requests done")
        ax2.set_ylabel("RSS MB")
        ax2.set_ylim(bottom=0)
        ax2.set_title(f"{shown['n']:,}-URL FetchMany ({shown.get('cell')}, {shown.get('transport')}): "
                      "RSS over the batch")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

