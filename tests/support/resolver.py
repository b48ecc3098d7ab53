"""A DNS server that holds every query until told to answer, and a thread whose resolver uses it.

fetchpool resolves names itself (the SSRF guard's ``getaddrinfo``, in a worker thread), through
the system resolver, which reads /etc/resolv.conf. To make a resolution slow for real without
touching the machine's configuration, ``in_private_resolver`` runs a function in a thread of its
own mount namespace (Linux ``unshare(CLONE_NEWNS)`` acts on the calling thread only), where a
resolv.conf naming ``HoldingDns`` is bind-mounted over /etc/resolv.conf. Threads that thread
starts (the event loop's resolver workers) inherit the namespace; the rest of the process, and
the machine, keep the real file. Needs root (CAP_SYS_ADMIN), as the tests' network namespaces do.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_CLONE_NEWNS = 0x00020000
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_RESOLV_CONF = b"/etc/resolv.conf"


class HoldingDns:
    """A UDP DNS server on ``(address, 53)``, an address of 127.0.0.0/8 of its own: it records
    each query and answers none until ``release()``, then answers them all (and later ones at
    once) with NXDOMAIN. A thread of its own; ``with HoldingDns() as dns:``."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(50):  # bounded: a random loopback address whose port 53 is free
            address = f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}.{random.randrange(2, 255)}"
            try:
                self._socket.bind((address, 53))
                break
            except OSError:
                continue
        else:
            raise RuntimeError("no free loopback address with port 53 for the holding DNS server")
        self.address = address
        self._socket.settimeout(0.1)
        self._lock = threading.Lock()
        self._held: list[tuple[bytes, tuple[str, int]]] = []
        self.queries: list[str] = []
        self._released = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="holding-dns", daemon=True)

    def __enter__(self) -> HoldingDns:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
        self._stop.set()
        self._thread.join(5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, client = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.queries.append(_question(query))
                if not self._released:
                    self._held.append((query, client))
                    continue
            self._answer(query, client)

    def _answer(self, query: bytes, client: tuple[str, int]) -> None:
        # Same id and question; flags: response, recursion available, rcode 3 (NXDOMAIN).
        flags = 0x8000 | (struct.unpack(">H", query[2:4])[0] & 0x0100) | 0x0080 | 3
        header = query[:2] + struct.pack(">HHHHH", flags, 1, 0, 0, 0)
        with contextlib.suppress(OSError):
            self._socket.sendto(header + query[12:], client)

    def release(self) -> None:
        """Answer every held query and every later one."""
        with self._lock:
            self._released = True
            held, self._held = self._held, []
        for query, client in held:
            self._answer(query, client)

    def wait_query(self, name: str, timeout: float = 10.0) -> None:
        """Block until a query for ``name`` arrived (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout
        while not any(q.rstrip(".") == name for q in self.queries):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no DNS query for {name} within {timeout} s (queries: {self.queries})")
            time.sleep(0.01)


def _question(query: bytes) -> str:
    labels, position = [], 12
    while position < len(query) and query[position]:
        length = query[position]
        labels.append(query[position + 1 : position + 1 + length].decode("ascii", "replace"))
        position += 1 + length
    return ".".join(labels)


def in_private_resolver(nameserver: str, function: Callable[[], T], timeout_s: float = 60.0) -> T:
    """Run ``function()`` in a thread whose /etc/resolv.conf names only ``nameserver`` (one
    attempt, 30 s timeout); return its result or raise its exception. Raises OSError when the
    mount namespace cannot be made (not root)."""
    outcome: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="fetchpool-resolv-") as directory:
        conf = Path(directory) / "resolv.conf"
        conf.write_text(f"nameserver {nameserver}\noptions timeout:30 attempts:1\n")

        def run() -> None:
            try:
                _enter_private_mounts(str(conf).encode())
                outcome["result"] = function()
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=run, name="private-resolver")
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"the function in the private resolver thread ran over {timeout_s} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def _enter_private_mounts(conf: bytes) -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)} (needs root)")

    check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Private first: a bind mount in a namespace that shares propagation with the host's would
    # appear on the host too.
    check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    check(libc.mount(conf, _RESOLV_CONF, None, _MS_BIND, None), "mount --bind resolv.conf")
