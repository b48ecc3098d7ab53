"""The runs beside the matrix: a 100,000-URL FetchMany batch (RSS over time), a resize-under-load
run (limits changed every second), and a py-spy profile of the service (and its caller)."""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.infra import (
    CLIENTS,
    REPO,
    Env,
    Workspace,
    json_line,
    log,
    peak_rss_mb,
    proc_rss_mb,
    run_proc,
    thread_cpu,
)
from bench.matrix import Cell, transport_flags

PYSPY_PIN = "py-spy==0.4.3"


def _caller_cmd(env: Env, ws: Workspace, target: str, cells: list[Cell], n: int, c: int, mode: str,
                run_id: str) -> list[str]:
    cmd = [sys.executable, str(CLIENTS / "fetchpool_client.py")]
    for cell in cells:
        cmd += ["--url", env.url(cell.scheme, cell.size), "--expect", str(ws.page(cell.size))]
    return [*cmd, "-n", str(n), "-c", str(c), "--run-id", run_id, "--target", target, "--mode", mode]


def _stats_total(target: str) -> int | None:
    import grpc
    from fetchpool.v1 import fetch_pb2 as pb
    from fetchpool.v1 import fetch_pb2_grpc as pb_grpc

    try:
        with grpc.insecure_channel(target) as channel:
            reply = pb_grpc.PoolAdminStub(channel).GetPoolStats(pb.GetPoolStatsRequest(), timeout=2)
        return sum(p.requests_total for p in reply.pools)
    except grpc.RpcError:
        return None


def memory_run(env: Env, ws: Workspace, *, n: int, c: int, cell: Cell, transport: str, warmup: int = 500,
               interval: float = 1.0) -> dict[str, Any]:
    """One FetchMany of ``n`` URLs through a fresh service; the service's RSS sampled every ``interval`` s."""
    svc = env.service(proxy=cell.via_proxy, extra=transport_flags(transport))
    out: dict[str, Any] = {"n": n, "c": c, "cell": cell.key, "transport": transport, "warmup": warmup,
                           "interval_s": interval}
    try:
        pid = svc.pid
        out["rss_mb_started"] = round(proc_rss_mb(pid), 1)
        warm = run_proc(_caller_cmd(env, ws, svc.target, [cell], warmup, c, "many", "warmup"), timeout=300)
        out["warmup_ok"] = (json_line(warm.stdout) or {}).get("ok")
        time.sleep(1.5)
        base = proc_rss_mb(pid)
        base_total = _stats_total(svc.target) or 0
        out["rss_mb_baseline"] = round(base, 1)
        samples: list[list[float]] = []
        t0 = time.monotonic()
        next_at = 0.0

        def sample(caller_pid: int | None) -> None:
            nonlocal next_at
            now = time.monotonic() - t0
            if caller_pid is not None and now < next_at:
                return
            next_at += interval
            done = _stats_total(svc.target)
            caller = None
            if caller_pid is not None:
                with contextlib.suppress(Exception):
                    caller = round(proc_rss_mb(caller_pid), 1)
            samples.append([round(now, 2), round(proc_rss_mb(pid), 1), caller,  # type: ignore[list-item]
                            (done - base_total) if done is not None else None])

        log(f"memory: FetchMany of {n:,} URLs ({cell.key}, {transport}), service RSS every {interval:g} s")
        done = run_proc(_caller_cmd(env, ws, svc.target, [cell], n, c, "many", "mem"),
                        timeout=max(600.0, n / 50), on_tick=sample, tick=0.05)
        sample(None)
        res = json_line(done.stdout) or {}
        out.update({k: res.get(k) for k in ("ok", "bad", "errors", "rps", "wall_s", "maxrss_mb", "first_error")})
        out["rc"] = done.rc
        out["caller_peak_rss_mb"] = res.get("maxrss_mb")
        out["service_peak_rss_mb"] = round(peak_rss_mb(pid) or 0, 1)
        out["samples"] = samples  # [t_s, service_rss_mb, caller_rss_mb, requests_done]
        rss = [s[1] for s in samples]
        out["rss_mb_max"] = max(rss) if rss else None
        out["rss_growth_mb"] = round(max(rss) - base, 1) if rss else None
        # Flatness: RSS in the last fifth of the run against the second fifth, and the slope over the
        # second half (least squares, MB per 10,000 requests).
        if len(rss) >= 10:
            k = len(rss) // 5
            out["rss_drift_mb"] = round(sum(rss[-k:]) / k - sum(rss[k:2 * k]) / k, 1)
            half = [(s[3], s[1]) for s in samples[len(samples) // 2:] if s[3] is not None]
            if len(half) >= 3:
                mx = sum(x for x, _ in half) / len(half)
                my = sum(y for _, y in half) / len(half)
                var = sum((x - mx) ** 2 for x, _ in half)
                if var:
                    slope = sum((x - mx) * (y - my) for x, y in half) / var
                    out["rss_slope_mb_per_10k"] = round(slope * 10_000, 2)
        log(f"memory: ok={out['ok']} rps={out['rps']} baseline {base:.1f} MB, max {out['rss_mb_max']} MB, "
            f"growth {out['rss_growth_mb']} MB, drift {out.get('rss_drift_mb')} MB")
    finally:
        env.stop_service(svc)
    return out


def resize_run(env: Env, ws: Workspace, *, secs: float, every: float, c: int, transport: str) -> dict[str, Any]:
    """FetchStream load over h1 and h2, 2 KB and 100 KB, while the pool limits change every ``every`` s."""
    svc = env.service(proxy=False, extra=transport_flags(transport))
    cells = [Cell("h1", "2KB"), Cell("h2", "2KB"), Cell("h1", "100KB"), Cell("h2", "100KB")]
    cap = int(max(1000, 4000 * secs))
    try:
        log(f"resize: {secs:g} s of FetchStream load ({transport}), limits changed every {every:g} s")
        cmd = [*_caller_cmd(env, ws, svc.target, cells, cap, c, "resize", "resize"),
               "--duration", str(secs), "--resize-every", str(every)]
        done = run_proc(cmd, timeout=secs + 180)
    finally:
        env.stop_service(svc)
    res = json_line(done.stdout) or {}
    out = {k: res.get(k) for k in ("n", "ok", "bad", "errors", "rps", "p50_ms", "p99_ms", "resizes",
                                   "resize_failures", "limits_applied", "pools", "first_error", "proto")}
    out.update(secs=secs, every=every, c=c, rc=done.rc, cells=[x.key for x in cells], transport=transport)
    out["failed"] = (res.get("errors") or 0) + (res.get("bad") or 0) if res else None
    if done.rc != 0 and not res:
        out["stderr_tail"] = done.stderr[-600:]
    log(f"resize: sent={out['n']} ok={out['ok']} failed={out['failed']} resizes={out['resizes']}")
    return out


# --------------------------------------------------------------------------- profile
def ensure_pyspy() -> str | None:
    """The py-spy binary, installed into this venv when missing; None if that fails."""
    found = shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy")
    if Path(found).exists():
        return str(found)
    log(f"installing {PYSPY_PIN} into {Path(sys.executable).parent.parent}")
    done = run_proc([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", PYSPY_PIN],
                    timeout=600)
    path = Path(sys.executable).parent / "py-spy"
    return str(path) if done.rc == 0 and path.exists() else None


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/service/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{m.group('func')}"


def summarize_raw(path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive sample shares per file:function from py-spy's raw (collapsed) output."""
    selfc: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    if not path.exists():
        return {"samples": 0, "self": [], "inclusive": []}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames or any("_find_and_load" in f for f in frames):  # start-up imports
            continue
        total += k
        selfc[frames[-1]] += k
        for name in set(frames):
            incl[name] += k

    def share(counter: collections.Counter[str], k: int = top) -> list[list[Any]]:
        return [[name, round(100 * v / total, 1)] for name, v in counter.most_common(k)] if total else []

    by_package: collections.Counter[str] = collections.Counter()
    for name, v in selfc.items():
        path = name.split(":", 1)[0]
        by_package[path.split("/", 1)[0] if "/" in path else path.removesuffix(".py")] += v

    # Frames every stack goes through say nothing about where the time goes.
    skip = ("<module>", "runpy", "asyncio/runners.py", "BaseEventLoop.run_forever", "BaseEventLoop.run_until_complete",
            "BaseEventLoop._run_once", "fetchpool/cli.py", "fetchpool/__main__.py", "Handle._run",
            "Thread._bootstrap", "fetchpool_client.py:main")
    inclusive = [row for row in share(incl, len(incl)) if not any(s in row[0] for s in skip)][:top]
    return {"samples": total, "self": share(selfc), "inclusive": inclusive, "self_by_package": share(by_package, 12)}


def profile_run(env: Env, ws: Workspace, *, cell: Cell, n: int, c: int, outdir: Path, stamp: str,
                transport: str | None) -> dict[str, Any]:
    """py-spy on a fresh service (attached) and on its gRPC caller (launched under py-spy), one FetchMany;
    ``transport`` None: the service's own default (no ``--transport`` flag)."""
    spy = ensure_pyspy()
    if spy is None:
        return {"error": f"py-spy unavailable (pip install {PYSPY_PIN} failed)"}
    svc = env.service(proxy=cell.via_proxy, extra=transport_flags(transport) if transport else [])
    tag = f"{stamp}-{cell.key.replace('/', '-')}-{transport or 'default'}"
    svc_raw, caller_raw = outdir / f"profile-{tag}-service.txt", outdir / f"profile-{tag}-caller.txt"
    out: dict[str, Any] = {"cell": cell.key, "n": n, "c": c, "transport": transport,
                           "tool": "py-spy record --gil -r 200 (Python frames of samples holding the GIL, i.e. "
                                   "Python CPU; C code running without the GIL, such as gRPC's core, is in the "
                                   "per-thread CPU table instead)"}
    try:
        log(f"profile: py-spy on the service (pid {svc.pid}) and the caller, FetchMany of {n:,} URLs, {cell.key}, "
            f"{transport}")
        with open(outdir / f"profile-{tag}-pyspy.log", "wb") as spylog:
            recorder = subprocess.Popen(
                [spy, "record", "--gil", "-p", str(svc.pid), "-r", "200", "-f", "raw", "-o", str(svc_raw),
                 "-d", "600"],
                stdout=spylog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            time.sleep(1.5)
            threads_before = thread_cpu(svc.pid)
            cmd = [spy, "record", "--gil", "-r", "200", "-f", "raw", "-o", str(caller_raw), "--",
                   *_caller_cmd(env, ws, svc.target, [cell], n, c, "many", "profile")]
            done = run_proc(cmd, timeout=600, cwd=REPO)
            threads_after = thread_cpu(svc.pid)
        finally:
            recorder.send_signal(signal.SIGINT)
            try:
                recorder.wait(30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait(5)
        res = json_line(done.stdout) or {}
        out.update(ok=res.get("ok"), rps=res.get("rps"), rc=done.rc, first_error=res.get("first_error"))
        if res.get("ok") != n:
            out["invalid"] = (f"only {res.get('ok')} of {n} requests ok ({res.get('first_error')}): "
                              "not a profile of fetching")
        per_thread = []
        for tid, (name, cpu) in threads_after.items():
            used = cpu - threads_before.get(tid, (name, 0.0))[1]
            if used > 0:
                per_thread.append({"tid": tid, "name": name, "main": tid == svc.pid, "cpu_s": round(used, 2)})
        out["threads"] = sorted(per_thread, key=lambda t: -t["cpu_s"])
    finally:
        env.stop_service(svc)
    out["service"] = summarize_raw(svc_raw)
    out["caller"] = summarize_raw(caller_raw)
    out["raw_files"] = [str(svc_raw), str(caller_raw)]
    return out
