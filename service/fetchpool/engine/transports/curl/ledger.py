"""The curl transport's sockets, as the OS sees them.

libcurl opens every socket through our OPENSOCKETFUNCTION and hands it to SOCKOPTFUNCTION before
connecting, so each one is recorded here by descriptor and inode. libcurl closes them itself
(pycurl's CLOSESOCKETFUNCTION cannot be used with a multi handle: its callback must run inside
the transfer that opened the socket, and a connection closed by another transfer or by the multi
then leaks its descriptor), so a socket counts as open while its descriptor still points at the
same inode: a closed descriptor, or one reused for another socket, drops it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass


@dataclass(slots=True)
class Connection:
    """One socket libcurl opened: to a target, or to the proxy."""

    fd: int
    inode: int
    opened: float  # monotonic seconds
    last_used: float
    version: str = "HTTP/1.1"
    retired: bool = False  # shut down at its request limit (counted as retired then)

    @property
    def key(self) -> tuple[int, int]:
        return self.fd, self.inode


class Ledger:
    """Sockets by descriptor; :meth:`alive` prunes those closed since."""

    __slots__ = ("_sockets",)

    def __init__(self) -> None:
        self._sockets: dict[int, Connection] = {}

    def opened(self, fd: int, now: float) -> None:
        """libcurl made socket ``fd`` (it is about to connect it)."""
        self._sockets[fd] = Connection(fd, os.fstat(fd).st_ino, now, now)

    def get(self, fd: int) -> Connection | None:
        """The open connection on ``fd``, if it is one of ours."""
        connection = self._sockets.get(fd)
        if connection is not None and _inode(fd) != connection.inode:
            del self._sockets[fd]
            return None
        return connection

    def alive(self) -> list[Connection]:
        """The sockets still open."""
        for fd, connection in list(self._sockets.items()):
            if _inode(fd) != connection.inode:
                del self._sockets[fd]
        return list(self._sockets.values())

    def socket_of(self, local: tuple[str, int]) -> int:
        """The descriptor of the open socket whose local address is ``local`` (-1: none)."""
        for connection in self.alive():
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(connection.fd)) as sock:
                if sock.getsockname()[:2] == local:
                    return connection.fd
        return -1

    def forget(self) -> None:
        """The multi handle that owned them all was closed."""
        self._sockets.clear()


def _inode(fd: int) -> int:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return -1


def peer_closed(fd: int) -> bool:
    """Whether the peer closed an idle socket (EOF or reset, seen by a peek; readable data alone,
    such as an HTTP/2 PING or SETTINGS, is not a close)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
