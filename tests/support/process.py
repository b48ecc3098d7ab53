"""Run a real server binary in the foreground as a child process: ports, start, readiness, stop."""

from __future__ import annotations

import abc
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

INSTALL_HINT = "run scripts/install-system-deps.sh"

# Ports are drawn from below the kernel's ephemeral range: no outgoing connection can then take a
# test server's port as its source port, and a client retrying against a proxy that a test has
# stopped cannot TCP-self-connect to that port and block the proxy's restart.
_PORT_FLOOR = 20000
_PORT_TRIES = 200
_handed_out: set[int] = set()
_random = random.SystemRandom()

_TCP_LISTEN = "0A"


class MissingBinaryError(FileNotFoundError):
    """A server binary is not installed."""


class ServerStartError(RuntimeError):
    """A server exited or did not listen on its ports in time; the message holds its output."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` and was not returned before in this process.

    Raises RuntimeError when no free port is found in a bounded number of tries.
    """
    low = _ephemeral_low()
    high = low if low > _PORT_FLOOR + 1000 else 65536
    for _ in range(_PORT_TRIES):
        port = _random.randrange(_PORT_FLOOR, high)
        if port in _handed_out:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port on {host} after {_PORT_TRIES} tries")


def listening_ports() -> set[int]:
    """Return the TCP ports with a socket in LISTEN state in this network namespace (Linux)."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == _TCP_LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def find_binary(name: str) -> str:
    """Return the path of executable ``name``, also searching /usr/sbin and /sbin.

    Raises MissingBinaryError (telling to run the install script) when it is not installed.
    """
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    path = shutil.which(name, path=search)
    if path is None:
        raise MissingBinaryError(f"{name} is not installed: {INSTALL_HINT}")
    return path


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


class ServerProcess(abc.ABC):
    """One server process in its own process group, its config, logs and pid in ``workdir``.

    Subclasses write their config in ``_write_config`` and give the command and the ports that
    must be listening before ``start`` returns. Usable as a context manager (start, then stop and
    remove the workdir when it was created here). Signals go to the whole process group, so the
    server's own children (nginx workers) go with it.
    """

    name: ClassVar[str]

    def __init__(self, workdir: Path | None = None) -> None:
        self._owns_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix=f"fetchpool-{self.name}-")) if workdir is None else workdir
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.output_path = self.workdir / f"{self.name}.out"
        self._proc: subprocess.Popen[bytes] | None = None

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """The argv that runs the server in the foreground."""

    @abc.abstractmethod
    def ports(self) -> Sequence[int]:
        """The loopback TCP ports this server listens on."""

    def _write_config(self) -> None:  # noqa: B027 - an optional hook, empty unless overridden
        """Write config files into workdir; called before every start."""

    def _log_paths(self) -> Sequence[Path]:
        """Server log files quoted in start errors."""
        return ()

    def _after_exit(self) -> None:  # noqa: B027 - an optional hook, empty unless overridden
        """Clean up what the server leaves outside workdir; called after every stop."""

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The server's pid (the process group leader). Raises RuntimeError when not running."""
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError(f"{self.name} is not running")
        return self._proc.pid

    def start(self, timeout: float = 15.0) -> Self:
        """Start the server and wait up to ``timeout`` seconds until all its ports listen.

        Raises MissingBinaryError, or ServerStartError (with the server's output) when it exits
        early or is not listening in time; the process is stopped in that case.
        """
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self._write_config()
        command = self._command()
        with self.output_path.open("ab") as output:
            self._proc = subprocess.Popen(
                command,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        wanted = set(self.ports())
        while True:
            if self._proc.poll() is not None:
                self._reap()
                raise ServerStartError(self._describe_failure(f"exited with {self._proc.returncode}"))
            if wanted <= listening_ports():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    self._describe_failure(f"not listening on {sorted(wanted)} after {timeout}s")
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` seconds, and reap it. Idempotent."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._proc.wait(timeout)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the process group at once (an abrupt crash, for fault tests) and reap it."""
        if self._proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self._proc.wait(5.0)
        self._reap()

    def restart(self, timeout: float = 15.0) -> Self:
        """Stop, then start again on the same ports. Raises as ``start`` does."""
        self.stop()
        return self.start(timeout)

    def ensure_running(self, timeout: float = 15.0) -> Self:
        """Start the server again if it is not running (say, a test stopped a shared one)."""
        if not self.running:
            self.start(timeout)
        return self

    def close(self) -> None:
        """Stop the server and remove workdir when this object created it."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        # ProcessLookupError: the whole group is gone already, nothing to signal.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def _reap(self) -> None:
        # Children of the group that outlived the leader (a worker mid-shutdown) must not linger.
        assert self._proc is not None
        self._signal_group(signal.SIGKILL)
        self._after_exit()

    def _describe_failure(self, what: str) -> str:
        parts = [f"{self.name} {what}; workdir {self.workdir}", f"--- output:\n{_tail(self.output_path)}"]
        parts += [f"--- {path.name}:\n{_tail(path)}" for path in self._log_paths()]
        return "\n".join(parts)
