"""Aggregation (medians, per-round ratios) and the goals; ``bench.render`` writes them out."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

from bench.matrix import FETCHPOOL, LATENCY, REFERENCE_TRANSPORT, WIDE, label, split_key

Row = dict[str, Any]
#: FetchMany and FetchStream: the tags of their ratios.
MODES = (("fp-many", "FM"), ("fp-stream", "FS"))
#: The alternatives fetchpool's throughput is divided by.
OTHERS = ("httpx", "aiohttp", "unpooled", "httpx2", "wrk")


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


def transports_of(groups: Iterable[str]) -> list[str]:
    """The fetchpool transports among run keys, in first-seen order."""
    seen: dict[str, None] = {}
    for key in groups:
        client, transport = split_key(key)
        if client in FETCHPOOL and transport:
            seen[transport] = None
    return list(seen)


def _ratios(g: dict[str, list[Row]], transport: str) -> dict[str, float | None]:
    """fetchpool on ``transport`` against every other client of the cell, and against the reference transport."""
    ratios: dict[str, float | None] = {}
    for mode, tag in MODES:
        runs = g.get(f"{mode}@{transport}")
        if not runs:
            continue
        for other in OTHERS:
            if other in g:
                ratios[f"{tag}/{other}"] = round_ratio(runs, g[other])
        if "httpx" in g:
            ratios[f"{tag} cpu/httpx cpu"] = round_ratio(runs, g["httpx"], "cpu_ms_per_1k")
        reference = g.get(f"{mode}@{REFERENCE_TRANSPORT}")
        if reference:
            ratios[f"{tag} cpu/ref cpu"] = round_ratio(runs, reference, "cpu_ms_per_1k")
    return ratios


def summarize(results: list[Row]) -> dict[str, Any]:
    """Per cell: per run key medians, and the key ratios per fetchpool transport."""
    out: dict[str, Any] = {}
    for cell, g in by_cell(results).items():
        transports = transports_of(g)
        clients = {}
        for key, rows in g.items():
            rps = [r["rps"] for r in rows if r.get("rps")]
            clients[key] = {
                "label": label(key),
                "rounds": len(rows),
                "rps_median": med(rps),
                "rps_min": min(rps) if rps else None,
                "rps_max": max(rps) if rps else None,
                "p50_ms": med(r.get("p50_ms") for r in rows),
                "p99_ms": med(r.get("p99_ms") for r in rows),
                "cpu_ms_per_1k": med(r.get("cpu_ms_per_1k") for r in rows),
                "peak_rss_mb": med(r.get("peak_rss_mb") for r in rows),
                "caller_cpu_ms_per_1k": med(r.get("caller_cpu_ms_per_1k") for r in rows),
                "caller_peak_rss_mb": med(r.get("maxrss_mb") for r in rows) if split_key(key)[1] else None,
                "requests": sum(r.get("n") or 0 for r in rows),
                "ok": sum(r.get("ok") or 0 for r in rows),
                "failed": failed(rows),
                "proto": sorted({p for r in rows for p in (r.get("proto") or {})}),
                "fm_over": {t: round_ratio(g[f"fp-many@{t}"], rows) for t in transports if f"fp-many@{t}" in g},
                "fs_over": {t: round_ratio(g[f"fp-stream@{t}"], rows) for t in transports if f"fp-stream@{t}" in g},
            }
        out[cell] = {"clients": clients, "ratios": {t: _ratios(g, t) for t in transports},
                     "httpx2/httpx": round_ratio(g["httpx2"], g["httpx"]) if "httpx2" in g and "httpx" in g else None}
    return out


def _cell_goals(add: Callable[..., None], cell: str, r: dict[str, float | None], transport: str) -> None:
    """The per-cell goals of one transport's ratios ``r`` (see :func:`goals`)."""
    scenario = cell.split("/")[0]
    if "FM/httpx" in r:
        add("throughput vs in-process pooled httpx", cell, ">= 1.5x", lambda v: v >= 1.5, r, "/httpx", transport)
    if "FM/aiohttp" in r:
        floor = 1.0 if scenario in WIDE else 0.5
        add("throughput vs in-process aiohttp", cell, f">= {floor}x", lambda v, f=floor: v >= f, r, "/aiohttp",
            transport)
    if scenario in LATENCY and "FM/unpooled" in r:
        add("~50 ms RTT: throughput vs unpooled", cell, ">= 2.5x", lambda v: v >= 2.5, r, "/unpooled", transport)
    if "FM cpu/httpx cpu" in r:
        add("service CPU per 1k vs pooled httpx script", cell, "<= 1.3x", lambda v: v <= 1.3, r, " cpu/httpx cpu",
            transport)
    if cell in CPU_VS_REFERENCE and "FM cpu/ref cpu" in r:
        share = CPU_VS_REFERENCE[cell]
        add(f"service CPU per fetch vs the {REFERENCE_TRANSPORT} transport (same run)", cell, f"<= {share}x",
            lambda v, x=share: v <= x, r, " cpu/ref cpu", transport)


#: Issue 15's targets for the service's CPU per fetch on the default transport, as a share of the
#: reference (httpcore) transport's in the same run.
CPU_VS_REFERENCE = {"h2/2KB": 0.5, "h2/100KB": 0.4}


def goals(summary: dict[str, Any], memory: dict[str, Row], resize: dict[str, Row], default: str) -> list[Row]:
    """Each goal per cell and transport (the ``default`` transport's rows first: issue 15's goals
    are the default's; the others show how far each transport is), memory and resize per
    transport, with the FetchMany(Packed) and FetchStream(Packed) values and PASS/MISS."""
    rows: list[Row] = []

    def add(goal: str, cell: str, target: str, ok: Callable[[float], bool], r: dict[str, float | None], key: str,
            transport: str = default) -> None:
        fm, fs = r.get(f"FM{key}"), r.get(f"FS{key}")
        vals = [v for v in (fm, fs) if v is not None]
        if not vals:
            verdict = "n/a"
        else:
            misses = [tag for tag, v in (("FetchMany", fm), ("FetchStream", fs)) if v is not None and not ok(v)]
            verdict = "PASS" if not misses else f"MISS ({', '.join(misses)})"
        rows.append({"goal": goal, "cell": cell, "transport": transport, "target": target, "fetchmany": fm,
                     "fetchstream": fs, "verdict": verdict})

    transports = {t: None for s in summary.values() for t in s["ratios"]}
    for transport in sorted(transports, key=lambda t: t != default):
        for cell, s in summary.items():
            _cell_goals(add, cell, s["ratios"].get(transport, {}), transport)
    for transport, m in memory.items():
        g = m.get("rss_growth_mb")
        complete = m.get("ok") == m.get("n")
        rows.append({"goal": f"{m['n']:,}-URL FetchMany: service RSS growth", "cell": m.get("cell"),
                     "transport": transport, "target": "< 50 MB", "fetchmany": g, "fetchstream": None,
                     "verdict": "n/a" if g is None else ("PASS" if g < 50 and complete else
                                                         "MISS" + ("" if complete else " (incomplete)"))})
    for transport, z in resize.items():
        f = z.get("failed")
        rows.append({"goal": "resize under load: failed requests", "cell": "h1+h2 mixed", "transport": transport,
                     "target": "= 0", "fetchmany": None, "fetchstream": f,
                     "verdict": "n/a" if f is None else ("PASS" if f == 0 and z.get("ok") else "MISS")})
    return rows
