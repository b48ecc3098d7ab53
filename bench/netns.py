"""The latency phase: a network namespace of our own whose loopback delays the packets to and from
the origin and proxy ports by ~25 ms each way (RTT ~50 ms), with nginx, the proxy, the fetchpool
service and every client inside it. The namespace is deleted afterwards, also on error.

This kernel has no ``sch_netem``, so the delay comes from ``bench/nfq_delay.py`` behind an
iptables NFQUEUE rule (``mangle PREROUTING -i lo``, matching only the server ports). The gRPC hop
between the fetchpool caller and the service is *not* delayed: the model is a service next to
its callers fetching from far-away origins, the deployment fetchpool is for.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.infra import BENCH, REPO, Env, Workspace, log, run_proc

NS_PREFIX = "fpb-"
QUEUE = 7


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def delete_netns(ns: str) -> None:
    """Kill whatever still runs inside ``ns`` (only this run's processes can be there) and delete it."""
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", ns, check=False)
    log(f"deleted network namespace {ns}")


def cleanup_stale() -> None:
    """Delete fpb-<pid> namespaces left by an earlier run whose process is gone."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"^({NS_PREFIX}(\d+))\b", line.strip())
        if m and not Path(f"/proc/{m.group(2)}").exists():
            delete_netns(m.group(1))


def run_phase(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Create the namespace, run ``python -m bench --inner`` inside it, delete it; returns its output."""
    cleanup_stale()
    ns = f"{NS_PREFIX}{os.getpid()}"
    ws_root = Path(spec["workspace"]["root"])
    spec_path, out_path = ws_root / "latency-spec.json", ws_root / "latency-out.json"
    spec = {**spec, "out": str(out_path)}
    spec_path.write_text(json.dumps(spec))
    try:
        _ip("netns", "add", ns)
        log(f"created network namespace {ns}")
        _ip("-n", ns, "link", "set", "lo", "up")
        done = run_proc(["ip", "netns", "exec", ns, sys.executable, "-m", "bench", "--inner", str(spec_path)],
                        timeout=timeout, passthrough_stderr=True)
        if done.rc != 0 or not out_path.exists():
            return {"error": f"latency phase exited {done.rc}{' (timeout)' if done.timed_out else ''}: "
                             f"{(done.stdout or '')[-800:]}", "results": []}
        return dict(json.loads(out_path.read_text()))
    finally:
        delete_netns(ns)


# --------------------------------------------------------------------------- inside the namespace
def _connect_rtt_ms(port: int, tries: int = 5) -> float:
    times = []
    for _ in range(tries):
        t0 = time.perf_counter()
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2)


def _undelayed_rtt_ms() -> float:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        return _connect_rtt_ms(listener.getsockname()[1])


class Delay:
    """The NFQUEUE rule and the delayer process; ``close`` removes both."""

    def __init__(self, ports: list[int], one_way_ms: float, workdir: Path) -> None:
        self.rule = ["-t", "mangle", "-A", "PREROUTING", "-i", "lo", "-p", "tcp", "-m", "multiport",
                     "--ports", ",".join(str(p) for p in ports), "-j", "NFQUEUE", "--queue-num", str(QUEUE),
                     "--queue-bypass"]
        ready = workdir / "nfq.ready"
        ready.unlink(missing_ok=True)
        self.log_path = workdir / "nfq_delay.log"
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, str(BENCH / "nfq_delay.py"), "--queue", str(QUEUE), "--delay-ms", str(one_way_ms),
                 "--ready-file", str(ready)],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        for _ in range(100):
            if ready.exists() or self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if not ready.exists():
            self.close()
            raise RuntimeError(f"nfq_delay did not start: {self.log_path.read_text()[-500:]}")
        subprocess.run(["iptables-legacy", *self.rule], check=True, capture_output=True, timeout=30)
        self.added = True

    def close(self) -> None:
        if getattr(self, "added", False):
            subprocess.run(["iptables-legacy", *[("-D" if a == "-A" else a) for a in self.rule]],
                           capture_output=True, timeout=30)
            self.added = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def inner_main(spec_path: str) -> int:
    """Entry point inside the namespace (``python -m bench --inner SPEC``)."""
    from bench.matrix import Cell, Runner, run_cells

    spec = json.loads(Path(spec_path).read_text())
    ws = Workspace.from_json(spec["workspace"])
    env = Env(ws, proxy_kind=spec["proxy_kind"], batch_concurrency=spec["c"])
    delay: Delay | None = None
    out: dict[str, Any] = {"results": []}
    os.chdir(REPO)
    try:
        env.start()
        one_way = spec["rtt_ms"] / 2
        delay = Delay(env.server_ports, one_way, ws.root)
        assert env.nginx is not None
        out["info"] = {
            "netns": Path("/proc/self/ns/net").resolve().name if Path("/proc/self/ns/net").exists() else "",
            "method": (f"tc netem is not in this kernel; bench/nfq_delay.py holds each packet to or from the nginx "
                       f"and proxy ports {one_way:g} ms (iptables NFQUEUE, mangle PREROUTING -i lo, inside the "
                       f"namespace); the gRPC hop caller->service is not delayed"),
            "one_way_ms": one_way,
            "tcp_connect_rtt_ms_origin": _connect_rtt_ms(env.nginx.https_port),
            "tcp_connect_rtt_ms_undelayed_port": _undelayed_rtt_ms(),
        }
        log(f"latency: {out['info']}")
        runner = Runner(env, ws, n=spec["n"], c=spec["c"], wrk_secs=spec["wrk_secs"],
                        req_timeout=spec["req_timeout"], proc_timeout=spec["proc_timeout"], wide=tuple(spec["wide"]))
        cells = [Cell(s, z) for s, z in spec["cells"]]
        out["results"] = run_cells(runner, cells, spec["clients"], spec["rounds"], spec["seed"], spec["transports"])
    except Exception as exc:
        out["error"] = repr(exc)
        log(f"latency phase failed: {exc!r}")
    finally:
        if delay is not None:
            delay.close()
        env.close()
        Path(spec["out"]).write_text(json.dumps(out))
    return 0
