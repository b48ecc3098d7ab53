"""Processes, servers and the work folder of one benchmark run.

Servers come from tests/support (the same nginx, squid, tinyproxy and ``fetchpool serve``
launchers the integration tests use). Everything started here is tracked and stopped by
``Env.close`` / ``Workspace.close``, also on error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
CLIENTS = BENCH / "clients"
TMP_ROOT = Path(os.environ.get("FETCHPOOL_BENCH_TMP", "/tmp/fetchpool-bench"))

if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from support import SITE_PAGES, Certs, Nginx, Squid, Tinyproxy, write_site  # noqa: E402
from support.fetchpool_service import FetchpoolService  # noqa: E402

#: Size label -> page nginx serves (tests/support/site.py writes them with these exact sizes).
PAGES = {"2KB": "small.html", "100KB": "large.html"}
assert SITE_PAGES["small.html"] == 2048 and SITE_PAGES["large.html"] == 102400


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- child processes
@dataclass
class Finished:
    """A child that ran to the end (or was killed at its timeout)."""

    rc: int
    stdout: str
    stderr: str
    cpu_s: float  # user + system of the child (and its reaped children), from wait4
    maxrss_mb: float  # the largest VmHWM seen while it ran (ru_maxrss would include the parent's)
    wall_s: float
    timed_out: bool = False


def run_proc(
    cmd: Sequence[str | Path],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    on_tick: Callable[[int], None] | None = None,
    tick: float = 0.02,
    passthrough_stderr: bool = False,
) -> Finished:
    """Run ``cmd`` in its own process group; wait up to ``timeout`` s (then SIGKILL the group).

    ``on_tick(pid)`` is called about every ``tick`` seconds while it runs (samplers).
    ``passthrough_stderr`` lets the child write to our stderr (its progress log) instead of capturing it.
    The child's CPU and peak RSS come from ``wait4``'s rusage.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=out, stderr=None if passthrough_stderr else err, stdin=subprocess.DEVNULL,
            env=full_env, cwd=cwd or REPO, start_new_session=True,
        )
        deadline = started + timeout
        timed_out = False
        hwm = 0.0
        try:
            while True:
                hwm = max(hwm, peak_rss_mb(proc.pid) or 0.0)
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                if on_tick is not None:
                    on_tick(proc.pid)
                time.sleep(tick)
        except BaseException:
            # Interrupted: let the child clean up (SIGTERM), then make sure.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            for _ in range(200):
                if os.wait4(proc.pid, os.WNOHANG)[0]:
                    break
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.wait4(proc.pid, 0)
            proc.returncode = -9
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        # Anything the child left in its group (it should leave nothing) goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        return Finished(
            rc=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            cpu_s=usage.ru_utime + usage.ru_stime,
            maxrss_mb=hwm,
            wall_s=time.monotonic() - started,
            timed_out=timed_out,
        )


def proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a running process (from /proc)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def proc_rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name, user + system CPU seconds) for every thread of ``pid`` now."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir() if Path(f"/proc/{pid}/task").exists() else ():
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1: raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of ``pid`` to its current RSS (Linux >= 4.0, own or root)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of ``pid`` in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- workspace
@dataclass
class Workspace:
    """Certs and site, made once per run under TMP_ROOT/run-<pid>; shared with the netns phase."""

    root: Path
    site: Path
    certs_dir: Path
    ca_pem: Path

    @classmethod
    def create(cls) -> Workspace:
        # Work folders of earlier runs that died (their pid is gone) are removed too.
        for old in TMP_ROOT.glob("run-*") if TMP_ROOT.is_dir() else ():
            pid = old.name.removeprefix("run-")
            if pid.isdigit() and (int(pid) == os.getpid() or not Path(f"/proc/{pid}").exists()):
                shutil.rmtree(old, ignore_errors=True)
        root = TMP_ROOT / f"run-{os.getpid()}"
        site, certs_dir = root / "site", root / "certs"
        root.mkdir(parents=True)
        os.chmod(root, 0o755)
        write_site(site)
        certs = Certs(certs_dir)
        return cls(root=root, site=site, certs_dir=certs_dir, ca_pem=certs.ca_pem)

    def page(self, size: str) -> Path:
        return self.site / PAGES[size]

    def to_json(self) -> dict[str, str]:
        return {k: str(getattr(self, k)) for k in ("root", "site", "certs_dir", "ca_pem")}

    @classmethod
    def from_json(cls, data: Mapping[str, str]) -> Workspace:
        return cls(**{k: Path(v) for k, v in data.items()})

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class _ReuseCerts(Certs):
    """A Certs over PEM files made earlier (no new CA): what nginx needs is the file paths."""

    def __init__(self, directory: Path) -> None:
        from support.certs import CertPair

        self.directory = directory
        self.ca_pem = directory / "ca.pem"
        self.server = CertPair(directory / "server.pem", directory / "server.key")
        self.cert_pem, self.key_pem = self.server


# --------------------------------------------------------------------------- servers
@dataclass
class Env:
    """nginx (plain HTTP/1.1 + TLS with h2) and one forward proxy in the current network namespace,
    plus fresh ``fetchpool serve`` processes on demand."""

    ws: Workspace
    proxy_kind: str = "squid"
    batch_concurrency: int = 50
    #: Variables added to the environment of every ``fetchpool serve`` started here (``PYTHONPATH``
    #: of another source tree: ``bench.profile_service --baseline-src``).
    service_env: dict[str, str] = field(default_factory=dict)
    nginx: Nginx | None = None
    proxy: Squid | Tinyproxy | None = None
    _services: list[FetchpoolService] = field(default_factory=list)

    def start(self) -> Env:
        workdir = self.ws.root / f"nginx-{os.getpid()}-{len(os.listdir(self.ws.root))}"
        self.nginx = Nginx(
            self.ws.site,
            _ReuseCerts(self.ws.certs_dir),
            keepalive_requests=1_000_000,
            keepalive_timeout=65.0,
            # The benchmark must not measure nginx writing its JSON access log.
            extra_locations="        access_log off;\n",
            workdir=workdir,
        ).start()
        ports = [self.nginx.https_port, self.nginx.http_port]
        if self.proxy_kind == "squid":
            self.proxy = Squid(allow_connect_ports=ports).start(timeout=30)
        else:
            self.proxy = Tinyproxy(allow_connect_ports=ports, log_level="Warning", max_clients=1000).start()
        log(f"servers: nginx {self.nginx.http_url} {self.nginx.https_url}, {self.proxy_kind} {self.proxy.url}")
        return self

    @property
    def server_ports(self) -> list[int]:
        assert self.nginx and self.proxy
        return [self.nginx.http_port, self.nginx.https_port, self.proxy.port]

    def url(self, scheme: str, size: str) -> str:
        assert self.nginx
        base = self.nginx.http_url if scheme == "http" else self.nginx.https_url
        return f"{base}/{PAGES[size]}"

    def proxy_url(self) -> str:
        assert self.proxy
        return self.proxy.url

    def service(self, *, proxy: bool, extra: Sequence[str] = ()) -> FetchpoolService:
        """A fresh, started ``fetchpool serve`` (stop it with ``stop_service``)."""
        flags = ["--batch-concurrency", str(self.batch_concurrency), "--log-level", "WARNING", *extra]
        if proxy:
            flags += ["--proxy", self.proxy_url()]
        svc = FetchpoolService(*flags, ca_pem=self.ws.ca_pem, env=self.service_env)
        self._services.append(svc)
        return svc.start(timeout=60)

    def stop_service(self, svc: FetchpoolService) -> None:
        svc.close()
        with contextlib.suppress(ValueError):
            self._services.remove(svc)

    def close(self) -> None:
        for svc in list(self._services):
            self.stop_service(svc)
        for server in (self.proxy, self.nginx):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.close()
        self.proxy = self.nginx = None


def json_line(text: str) -> dict[str, Any] | None:
    """The last JSON object line a client printed."""
    import json

    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return dict(json.loads(line))
            except ValueError:
                return None
    return None
