"""A loopback port where TCP connects hang, for the tests of a cancelled connect."""

from __future__ import annotations

import subprocess
import sys

Peer = tuple[str, int]

_BLACK_HOLE = """
import socket, sys, threading
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(0)
port = listener.getsockname()[1]
fillers = []
for _ in range(3):  # one fills the accept queue of a backlog of 0; the others wait in SYN_SENT
    filler = socket.socket()
    filler.setblocking(False)
    filler.connect_ex(("127.0.0.1", port))
    fillers.append(filler)
print(port, flush=True)

def pipe(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass

def relay(host, port):
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection((host, port))
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()

for line in sys.stdin:  # "open HOST PORT": accept from now on, relaying to HOST:PORT
    _, host, upstream_port = line.split()
    listener.listen(128)
    threading.Thread(target=relay, args=(host, int(upstream_port)), daemon=True).start()
"""


class SynBlackHole:
    """A loopback port where a TCP connect hangs: a listener whose accept queue is full, so the
    kernel drops every further SYN and a client stays in SYN_SENT until it gives up. ``open(peer)``
    turns it into a plain relay to ``peer`` (a proxy, say, so the pool can be probed afterwards).

    The listener and the connections filling its queue live in a child process, so none of
    them is a socket of the process under test. ``with SynBlackHole() as hole: hole.address``.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> SynBlackHole:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _BLACK_HOLE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._process.stdout is not None
        self.port = int(self._process.stdout.readline())
        return self

    def open(self, upstream: Peer) -> None:
        """Accept the waiting connections and every later one, relaying them to ``upstream``."""
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(f"open {upstream[0]} {upstream[1]}\n")
        self._process.stdin.flush()

    def __exit__(self, *exc_info: object) -> None:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)

    @property
    def address(self) -> Peer:
        return ("127.0.0.1", self.port)
