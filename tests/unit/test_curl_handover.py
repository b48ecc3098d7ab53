"""A proxied connection that its proxy ended is handed to libcurl on a socket pair
(curl/handover.py), on real loopback sockets; the engine tests see the effect
(test_engine_goaway through squid, tinyproxy and SOCKS5)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator

import pytest
from fetchpool.engine.transports.curl import handover
from fetchpool.engine.transports.curl.handover import TunnelEnds, ended_by_proxy

ANSWER = os.urandom(3 << 20)


@pytest.fixture
def connected() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(ours, the proxy's): a TCP connection on loopback, ours with a receive buffer that holds
    ANSWER (as the curl transport asks for a proxied socket)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = socket.socket()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        ours.connect(server.getsockname())
        proxy, _ = server.accept()
    with ours, proxy:
        yield ours, proxy


def _state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def _wait(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _send_and_close(ours: socket.socket, proxy: socket.socket, *, reset: bool) -> None:
    proxy.sendall(ANSWER)
    if reset:
        proxy.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    proxy.close()
    _wait(lambda: _state(ours) in (7, 8))  # CLOSE, CLOSE_WAIT


def test_an_open_connection_is_not_handed_over(connected: tuple[socket.socket, socket.socket]) -> None:
    ours, proxy = connected
    proxy.sendall(b"answer")
    _wait(lambda: bool(ours.recv(6, socket.MSG_PEEK)))
    assert ended_by_proxy(ours.fileno(), lambda fd: True) is None


def test_the_proxys_fin_is_an_end(connected: tuple[socket.socket, socket.socket]) -> None:
    ours, proxy = connected
    _send_and_close(ours, proxy, reset=False)
    assert ended_by_proxy(ours.fileno(), lambda fd: False) == "fin"


def test_a_reset_is_an_end_only_over_http2(connected: tuple[socket.socket, socket.socket]) -> None:
    # Over HTTP/1.1 a body that ends at the close would pass cut short: the reset stays libcurl's.
    ours, proxy = connected
    _send_and_close(ours, proxy, reset=True)
    assert ended_by_proxy(ours.fileno(), lambda fd: False) is None
    assert ended_by_proxy(ours.fileno(), lambda fd: True) == "reset"


def test_a_refused_connect_is_not_an_end() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = server.getsockname()
    with socket.socket() as sock:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(address)
        _wait(lambda: _state(sock) == 7)
        assert ended_by_proxy(sock.fileno(), lambda fd: True) is None
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0  # libcurl still reads why


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "reset"])
async def test_libcurl_reads_every_byte_then_the_end_and_its_writes_do_not_fail(
    connected: tuple[socket.socket, socket.socket], reset: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handover, "_PAIR_BUFFER", 1 << 16)  # less than ANSWER: fed as libcurl reads
    ours, proxy = connected
    fd = ours.fileno()  # stands for libcurl's descriptor
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    swaps: list[int] = []

    def swap(fd: int, make: Callable[[], None]) -> None:
        swaps.append(fd)
        make()

    class Tunnels:  # the engine's side: every connection speaks HTTP/2 here
        resets: list[tuple[str, int]] = []

        def tunnel_multiplexed(self, fd: int) -> bool:
            return True

        def tunnel_reset(self, local: tuple[str, int]) -> None:
            self.resets.append(local)

    tunnels = Tunnels()
    local = ours.getsockname()
    ends = TunnelEnds(loop, swap, tunnels)
    ends.track(fd)
    _send_and_close(ours, proxy, reset=reset)
    ends.hand_over_closed()
    assert swaps == [fd]
    assert stat.S_ISSOCK(os.fstat(fd).st_mode) and not os.get_blocking(fd)  # as libcurl made it
    assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_UNIX  # the TCP socket is closed
    assert tunnels.resets == ([local] if reset else [])  # its transfers' failures are the reset's
    ends.hand_over_closed()  # nothing more to hand over
    assert swaps == [fd]

    received = bytearray()
    async with asyncio.timeout(10):
        while True:
            try:
                chunk = ours.recv(1 << 16)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            if not chunk:
                break
            received += chunk
            ours.send(b"WINDOW_UPDATE")  # libcurl writes while it reads: never a broken pipe
    assert bytes(received) == ANSWER

    ours.close()  # libcurl closes its end: so does the pair
    await asyncio.sleep(0.05)
    ends.close()
