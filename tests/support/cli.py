"""Running ``fetchpool`` as a person or a script does: stdout and stderr each a pipe, a real
pseudo-terminal or a file, and the command under a real shell for pipelines (``| head``)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FETCHPOOL = [sys.executable, "-m", "fetchpool"]


@dataclass(frozen=True)
class Done:
    """What a finished command left: its status and what it wrote to stdout and stderr (text,
    ``\\r\\n`` of a terminal turned into ``\\n``; empty for a stream that went to a file)."""

    status: int
    out: str
    err: str


def _terminal(columns: int) -> tuple[int, int]:
    """A pseudo-terminal (leader, follower); ``columns`` 0 leaves its size unset, as openpty makes it."""
    leader, follower = pty.openpty()
    if columns:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return leader, follower


def run_cli(*args: str, stdout: str | Path = "pipe", stderr: str = "pipe", columns: int = 0,
            timeout: float = 60, python_options: tuple[str, ...] = ()) -> Done:
    """Run ``fetchpool ARGS``. ``stdout``: "pipe", "tty" or a file path; ``stderr``: "pipe" or
    "tty" (one terminal for both when both are "tty"); ``columns``: the terminal's width (0: never
    set, as in a bare pty); ``python_options`` go to the interpreter (``-X importtime``)."""
    leader = follower = None
    if "tty" in (stdout, stderr):
        leader, follower = _terminal(columns)
    out_file = open(stdout, "wb") if isinstance(stdout, Path) else None  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, *python_options, *FETCHPOOL[1:], *args],
        stdin=subprocess.DEVNULL,
        stdout=follower if stdout == "tty" else out_file or subprocess.PIPE,
        stderr=follower if stderr == "tty" else subprocess.PIPE,
    )
    if follower is not None:
        os.close(follower)
    streams = {"tty": leader, "out": process.stdout, "err": process.stderr}
    got = _read_all({name: s for name, s in streams.items() if s is not None}, process, timeout)
    process.wait(timeout=10)
    if out_file is not None:
        out_file.close()
    text = {name: data.decode(errors="replace").replace("\r\n", "\n") for name, data in got.items()}
    return Done(process.returncode, text["tty" if stdout == "tty" else "out"] if stdout in ("tty", "pipe") else "",
                text["tty" if stderr == "tty" else "err"])


def _read_all(streams: dict[str, Any], process: subprocess.Popen[bytes], timeout: float) -> dict[str, bytes]:
    """Everything written to ``streams`` (a terminal's leader fd, pipes) until each ends; bounded by ``timeout``."""
    fds = {(s if isinstance(s, int) else s.fileno()): name for name, s in streams.items()}
    chunks: dict[str, list[bytes]] = {name: [] for name in ("tty", "out", "err")}
    deadline = time.monotonic() + timeout
    try:
        while fds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(fds), [], [], 0.2)
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the process closed the terminal
                    data = b""
                if data:
                    chunks[fds[fd]].append(data)
                else:
                    del fds[fd]
            if not ready and process.poll() is not None and set(fds.values()) == {"tty"}:
                break  # a terminal also held by a child that outlives the process
    finally:
        if "tty" in streams:
            os.close(streams["tty"])
        for name in ("out", "err"):
            if name in streams:
                streams[name].close()
    return {name: b"".join(parts) for name, parts in chunks.items()}


def run_shell(script: str, timeout: float = 60) -> Done:
    """Run ``script`` in bash with ``pipefail``; ``$FETCHPOOL`` in it is this Python's fetchpool."""
    env = {**os.environ, "FETCHPOOL": " ".join(FETCHPOOL)}
    done = subprocess.run(["bash", "-c", f"set -o pipefail\n{script}"], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
    return Done(done.returncode, done.stdout, done.stderr)
