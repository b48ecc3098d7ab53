"""The comparison matrix: scenarios x page sizes (cells), clients, interleaved rounds."""

from __future__ import annotations

import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.infra import (
    BENCH,
    CLIENTS,
    Env,
    Workspace,
    json_line,
    log,
    peak_rss_mb,
    proc_cpu_s,
    reset_peak_rss,
    run_proc,
)

HTTPX2_VENV = Path(os.environ.get("FETCHPOOL_BENCH_HTTPX2_VENV", "/tmp/fetchpool-bench/venv-httpx2"))
HTTPX2_PIN = "httpx2[http2]==2.16.2"

SCENARIOS = {
    "h1": "direct, plain HTTP/1.1",
    "h2": "direct, HTTPS with HTTP/2",
    "proxy": "through the forward proxy (CONNECT + TLS, h2 inside)",
    "lat-h2": "~50 ms RTT (netns): direct, HTTPS with HTTP/2",
    "lat-proxy": "~50 ms RTT (netns): through the forward proxy (CONNECT + TLS)",
    "lat500-h2": "~50 ms RTT (netns), 500 in flight: direct, HTTPS with HTTP/2",
}
LATENCY = ("lat-h2", "lat-proxy", "lat500-h2")
#: Scenarios with a load of their own (``--wide-n`` URLs, ``--wide-c`` in flight: 3,000 and 500),
#: the regime of real scraping (far origins, many fetches in flight), run by these clients only.
WIDE = ("lat500-h2",)
WIDE_CLIENTS = ("fp-many", "fp-stream", "httpx", "aiohttp")

#: Client key -> label. Order is the table's order.
CLIENT_LABELS = {
    "fp-many": "fetchpool FetchManyPacked (gRPC, service)",
    "fp-stream": "fetchpool FetchStreamPacked (gRPC, service)",
    "httpx": "httpx pooled: one AsyncClient(http2=True) + gather",
    "httpx2": "httpx2 pooled: same script on the fork",
    "aiohttp": "aiohttp: TCPConnector(limit=100, per_host=C)",
    "unpooled": "httpx unpooled: new AsyncClient per request",
    "wrk": "wrk -t1 (ceiling; HTTP/1.1, no proxy)",
}
FETCHPOOL = ("fp-many", "fp-stream")
#: The transport fetchpool serve uses when told none, and the reference of the CPU goals.
REFERENCE_TRANSPORT = "httpcore"


def _transport_option() -> Any:
    from fetchpool.config import OPTIONS

    return next((o for o in OPTIONS if o.flag == "--transport"), None)


def default_transport() -> str:
    """The transport ``fetchpool serve`` uses by default (``--transport``'s default)."""
    option = _transport_option()
    return str(option.default) if option is not None else REFERENCE_TRANSPORT


def transport_flags(transport: str) -> list[str]:
    """The ``fetchpool serve`` flags that select ``transport``. Raises ValueError when this
    fetchpool has no ``--transport`` and the transport is not the one it always uses."""
    if _transport_option() is not None:
        return [f"--transport={transport}"]
    if transport == REFERENCE_TRANSPORT:
        return []
    raise ValueError(f"this fetchpool serve has no --transport option: it cannot run the {transport!r} transport")


def run_key(client: str, transport: str) -> str:
    """A run's client key: ``fp-many@httpcore`` for fetchpool (one per transport), else the client's."""
    return f"{client}@{transport}" if client in FETCHPOOL else client


def split_key(key: str) -> tuple[str, str | None]:
    """(client, transport or None) of a run key."""
    client, _, transport = key.partition("@")
    return client, transport or None


def label(key: str) -> str:
    client, transport = split_key(key)
    return CLIENT_LABELS.get(client, client) + (f" [{transport}]" if transport else "")


def run_keys(clients: list[str], transports: list[str], cell: Cell) -> list[str]:
    """The runs of one round on ``cell``: every client, fetchpool once per transport."""
    keys = [k for k in clients if not (k == "wrk" and cell.via_proxy) and (cell.scenario not in WIDE
                                                                            or k in WIDE_CLIENTS)]
    return [run_key(k, t) for k in keys for t in (transports if k in FETCHPOOL else [""])]


@dataclass(frozen=True)
class Cell:
    scenario: str
    size: str

    @property
    def key(self) -> str:
        return f"{self.scenario}/{self.size}"

    @property
    def scheme(self) -> str:
        return "http" if self.scenario == "h1" else "https"

    @property
    def via_proxy(self) -> bool:
        return self.scenario.endswith("proxy")

    @property
    def latency(self) -> bool:
        return self.scenario in LATENCY


def cells_for(scenarios: list[str], sizes: list[str], latency_sizes: list[str]) -> list[Cell]:
    out = []
    for s in scenarios:
        for z in latency_sizes if s in LATENCY else sizes:
            out.append(Cell(s, z))
    return out


def python_for(client: str) -> str:
    return str(HTTPX2_VENV / "bin" / "python") if client == "httpx2" else sys.executable


def ensure_httpx2(timeout: float = 600) -> str | None:
    """Install httpx2 into its own venv when missing. Returns None when ready, else why not."""
    py = HTTPX2_VENV / "bin" / "python"
    probe = [str(py), "-c", "import httpx2, h2"]
    if py.exists() and run_proc(probe, timeout=60).rc == 0:
        return None
    log(f"installing {HTTPX2_PIN} into {HTTPX2_VENV}")
    steps = [
        ["python3", "-m", "venv", "--clear", str(HTTPX2_VENV)],
        [str(HTTPX2_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", HTTPX2_PIN],
    ]
    for step in steps:
        done = run_proc(step, timeout=timeout)
        if done.rc != 0:
            return f"{' '.join(step[:3])} failed: {(done.stderr or done.stdout)[-500:]}"
    if run_proc(probe, timeout=60).rc != 0:
        return "httpx2 installed but does not import"
    return None


def _ms(token: str) -> float | None:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", token)
    if not m:
        return None
    value, unit = float(m.group(1)), m.group(2)
    return {"us": value / 1000, "ms": value, "s": value * 1000, "m": value * 60000}[unit]


def parse_wrk(out: str, n_expected: int | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"client": "wrk", "errors": 0, "bad": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else None
    for pct, key in (("50%", "p50_ms"), ("99%", "p99_ms")):
        m = re.search(rf"^\s+{re.escape(pct)}\s+(\S+)", out, re.M)
        r[key] = _ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    total = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    non2xx = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"^BAD (\d+)", out, re.M)
    r["bad"] = int(m.group(1)) if m else total  # no verdict from the script: count nothing as verified
    r["bad"] = max(r["bad"], non2xx)
    r["ok"] = max(0, total - r["bad"])
    r["n"] = total
    return r


class Runner:
    """Runs one client on one cell and returns its measurement (one dict)."""

    def __init__(self, env: Env, ws: Workspace, *, n: int, c: int, wrk_secs: float, req_timeout: float,
                 proc_timeout: float, wide: tuple[int, int] = (3000, 500)) -> None:
        self.env, self.ws = env, ws
        self.n, self.c = n, c
        self.wide = wide
        self.wrk_secs = wrk_secs
        self.req_timeout = req_timeout
        self.proc_timeout = proc_timeout

    def load(self, cell: Cell) -> tuple[int, int]:
        """(URLs per run, requests in flight) on ``cell``."""
        return self.wide if cell.scenario in WIDE else (self.n, self.c)

    def common_args(self, cell: Cell, run_id: str, n: int | None = None) -> list[str]:
        cell_n, c = self.load(cell)
        args = ["--url", self.env.url(cell.scheme, cell.size), "--expect", str(self.ws.page(cell.size)),
                "-n", str(n or cell_n), "-c", str(c), "--cacert", str(self.ws.ca_pem),
                "--timeout", str(self.req_timeout), "--run-id", run_id]
        if cell.via_proxy:
            args += ["--proxy", self.env.proxy_url()]
        return args

    def run(self, key: str, cell: Cell, rnd: int, n: int | None = None) -> dict[str, Any]:
        client, transport = split_key(key)
        n = n or self.load(cell)[0]
        run_id = f"{client}-{rnd}-{os.urandom(3).hex()}"
        started = time.time()
        if client == "wrk":
            res = self._wrk(cell)
        elif client in FETCHPOOL:
            res = self._fetchpool(client, transport, cell, run_id, n)
        else:
            script = "aiohttp_client.py" if client == "aiohttp" else "httpx_client.py"
            cmd = [python_for(client), CLIENTS / script, *self.common_args(cell, run_id, n)]
            if client in ("httpx", "httpx2", "unpooled"):
                cmd += ["--mode", "unpooled" if client == "unpooled" else "pooled"]
            if client == "httpx2":
                cmd += ["--lib", "httpx2"]
            done = run_proc(cmd, timeout=self.proc_timeout)
            res = json_line(done.stdout) or {"errors": n or self.n, "ok": 0, "rps": None}
            res.update(rc=done.rc, proc_cpu_s=round(done.cpu_s, 3), proc_maxrss_mb=round(done.maxrss_mb, 1))
            if done.rc != 0:
                res["stderr_tail"] = (done.stderr or done.stdout)[-600:]
        res.update(client_key=key, client=client, transport=transport, cell=cell.key, scenario=cell.scenario,
                   size=cell.size, round=rnd, ts=round(started, 3), loadavg=round(os.getloadavg()[0], 2))
        ok = res.get("ok") or 0
        cpu = res.get("service_cpu_s") if client in FETCHPOOL else res.get("cpu_window_s", res.get("proc_cpu_s"))
        res["cpu_ms_per_1k"] = round(cpu * 1e6 / ok, 1) if cpu is not None and ok else None
        if client in FETCHPOOL and ok and res.get("cpu_window_s") is not None:
            res["caller_cpu_ms_per_1k"] = round(res["cpu_window_s"] * 1e6 / ok, 1)
        res["peak_rss_mb"] = res.get("service_peak_rss_mb") if client in FETCHPOOL else \
            res.get("maxrss_mb", res.get("proc_maxrss_mb"))
        failed = (res.get("errors") or 0) + (res.get("bad") or 0)
        log(f"  {cell.key:<15} r{rnd} {key:<18} rps={res.get('rps')} p50={res.get('p50_ms')} "
            f"p99={res.get('p99_ms')} cpu/1k={res.get('cpu_ms_per_1k')}ms rss={res.get('peak_rss_mb')} "
            f"ok={ok} failed={failed}" + (f" !! {res.get('first_error') or res.get('stderr_tail', '')[-200:]}"
                                          if failed or res.get("rc") else ""))
        return res

    def _wrk(self, cell: Cell) -> dict[str, Any]:
        size = self.ws.page(cell.size).stat().st_size
        cmd = ["wrk", "-t1", f"-c{self.load(cell)[1]}", f"-d{self.wrk_secs:g}s", "--latency", "-s",
               BENCH / "wrk_verify.lua", self.env.url(cell.scheme, cell.size), "--", str(size)]
        done = run_proc(cmd, timeout=self.wrk_secs + 60)
        res = parse_wrk(done.stdout)
        res.update(rc=done.rc, proc_cpu_s=round(done.cpu_s, 3), proc_maxrss_mb=round(done.maxrss_mb, 1),
                   cpu_window_s=round(done.cpu_s, 3), maxrss_mb=round(done.maxrss_mb, 1), proto={"HTTP/1.1": res["ok"]})
        if done.rc != 0 or res["rps"] is None:
            res["stderr_tail"] = (done.stderr + done.stdout)[-600:]
        return res

    def _fetchpool(self, client: str, transport: str | None, cell: Cell, run_id: str, n: int | None
                   ) -> dict[str, Any]:
        """One fetchpool run; ``transport`` None: no ``--transport`` flag (the service's own default)."""
        flags = transport_flags(transport) if transport else []
        svc = self.env.service(proxy=cell.via_proxy,
                               extra=[*flags, "--batch-concurrency", str(self.load(cell)[1])])
        try:
            pid = svc.pid
            reset = reset_peak_rss(pid)
            cpu0 = proc_cpu_s(pid)
            mode = "many" if client == "fp-many" else "stream"
            cmd = [sys.executable, CLIENTS / "fetchpool_client.py", *self.common_args(cell, run_id, n),
                   "--target", svc.target, "--mode", mode]
            done = run_proc(cmd, timeout=self.proc_timeout)
            service_cpu = proc_cpu_s(pid) - cpu0
            peak = peak_rss_mb(pid)
        finally:
            self.env.stop_service(svc)
        res = json_line(done.stdout) or {"errors": n or self.n, "ok": 0, "rps": None}
        res.update(rc=done.rc, proc_cpu_s=round(done.cpu_s, 3), proc_maxrss_mb=round(done.maxrss_mb, 1),
                   service_cpu_s=round(service_cpu, 4), service_peak_rss_mb=round(peak, 1) if peak else None,
                   service_peak_rss_reset=reset)
        if done.rc != 0:
            res["stderr_tail"] = (done.stderr or done.stdout)[-600:]
        return res


def run_cells(runner: Runner, cells: list[Cell], clients: list[str], rounds: int, seed: str,
              transports: list[str] | None = None) -> list[dict[str, Any]]:
    """Every client on every cell (fetchpool once per transport), ``rounds`` times, order
    shuffled per round (A B A B ...)."""
    results = []
    for cell in cells:
        keys = run_keys(clients, transports or [default_transport()], cell)
        for rnd in range(1, rounds + 1):
            order = keys[:]
            random.Random(f"{seed}-{cell.key}-{rnd}").shuffle(order)
            log(f"{cell.key} round {rnd}/{rounds}: {' '.join(order)} (loadavg {os.getloadavg()[0]:.2f})")
            for client in order:
                results.append(runner.run(client, cell, rnd))
    return results
