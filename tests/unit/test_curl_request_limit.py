"""The curl transport's request limit per connection (engine/transports/curl/retire.py) as plain
policy: libcurl's PREREQFUNCTION answers for a script of transfers and connections, the
transfers held back and sent again, the connections shut down, the limit learned from
libcurl's own resends. The sockets are real (socket pairs stand for connections)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

import httpx
import pycurl
import pytest
from fetchpool.engine.phases import REFUSED
from fetchpool.engine.transports.curl.retire import RequestLimit

OK, HOLD = pycurl.PREREQFUNC_OK, pycurl.PREREQFUNC_ABORT


@dataclass(eq=False)
class Transfer:
    """What RequestLimit reads and writes of an Exchange."""

    opened: int = 0
    on: tuple[str, int] | None = None
    held_on: tuple[str, int] | None = None
    sends: int = 0
    resent: list[str] = field(default_factory=list)
    reset: str = ""
    busy: bool = False
    fresh: bool = False
    done: bool = False
    request: Any = field(default_factory=lambda: httpx.Request("GET", "https://example.com/"))


class Connections:
    """Real sockets, found by a made-up local address as libcurl's callback gives it."""

    def __init__(self) -> None:
        self.sockets: dict[tuple[str, int], socket.socket] = {}
        self.peers: list[socket.socket] = []

    def open(self, port: int) -> tuple[str, int]:
        ours, peer = socket.socketpair()
        self.sockets[("127.0.0.1", port)] = ours
        self.peers.append(peer)
        return "127.0.0.1", port

    def socket_of(self, key: tuple[str, int]) -> int:  # as Ledger's
        sock = self.sockets.get(key)
        return sock.fileno() if sock is not None else -1

    def get(self, fd: int) -> None:  # as Ledger's: no connection records here
        return None

    def shut(self, key: tuple[str, int]) -> bool:
        """Whether the socket was shut down (it reads the end of its stream)."""
        try:
            return self.sockets[key].recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False


@pytest.fixture
def connections() -> Any:
    made = Connections()
    yield made
    for sock in [*made.sockets.values(), *made.peers]:
        sock.close()


def make(limit: int, connections: Connections) -> tuple[RequestLimit, list[Transfer]]:
    resent: list[Transfer] = []
    return RequestLimit(limit, resent.extend, connections), resent  # type: ignore[arg-type]


def answers_on_a_new_connection(limit: RequestLimit, connections: Connections, port: int, count: int) -> list[int]:
    """PREREQFUNCTION's answers for ``count`` transfers on a new connection from ``port``."""
    key = connections.open(port)
    transfers = [Transfer(opened=1)] + [Transfer() for _ in range(count - 1)]
    return [limit.prereq(t, *key) for t in transfers]  # type: ignore[arg-type]


def test_the_limit_holds_back_the_next_transfers_and_replaces_the_connection(
        connections: Connections, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "getsockname", lambda self: ("127.0.0.1", 40001))  # socket pairs have none
    limit, _ = make(2, connections)
    key = connections.open(40001)
    first, second, third, fourth = Transfer(opened=1), Transfer(), Transfer(), Transfer()
    assert limit.prereq(first, *key) == OK  # type: ignore[arg-type]
    assert limit.prereq(second, *key) == OK  # type: ignore[arg-type]
    assert limit.prereq(third, *key) == HOLD  # type: ignore[arg-type]
    assert RequestLimit.held_back(third, pycurl.error(pycurl.E_ABORTED_BY_CALLBACK, ""))  # type: ignore[arg-type]
    assert not RequestLimit.held_back(first, pycurl.error(pycurl.E_ABORTED_BY_CALLBACK, ""))  # type: ignore[arg-type]
    # Two transfers still on the connection: the first held back goes now, on a new connection
    # of its own (it replaces this one); the next ones wait for this one to end.
    assert not limit.wait(third) and third.fresh  # type: ignore[arg-type]
    assert limit.prereq(fourth, *key) == HOLD  # type: ignore[arg-type]
    assert limit.wait(fourth) and not fourth.fresh  # type: ignore[arg-type]
    first.done = True
    assert limit.ended(first) == []  # type: ignore[arg-type]
    assert not connections.shut(key)
    second.done = True
    assert limit.ended(second) == [fourth]  # type: ignore[arg-type]  # the last one off: sent again now
    assert connections.shut(key)  # and the connection shut down for libcurl to drop
    assert limit.retired == 1
    assert (first.sends, second.sends, third.sends, fourth.sends) == (1, 1, 0, 0)


def test_a_connection_at_its_limit_and_idle_is_retired_at_once(
        connections: Connections, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "getsockname", lambda self: ("127.0.0.1", 40002))
    limit, _ = make(1, connections)
    key = connections.open(40002)
    first, late = Transfer(opened=1), Transfer()
    assert limit.prereq(first, *key) == OK  # type: ignore[arg-type]
    first.done = True
    limit.ended(first)  # type: ignore[arg-type]
    assert connections.shut(key)  # retired as its last transfer ended
    # libcurl may still offer the connection it has not noticed is shut: the request fails to
    # leave and libcurl sends it elsewhere; that is not a send of it.
    assert limit.prereq(late, *key) == OK  # type: ignore[arg-type]
    assert (late.sends, late.on) == (0, None)


def test_a_limit_is_learned_from_two_connections_that_refused_at_the_same_count(
        connections: Connections) -> None:
    limit, _ = make(0, connections)  # no configured limit
    for port in (40010, 40011):
        key = connections.open(port)
        transfers = [Transfer(opened=1)] + [Transfer() for _ in range(5)]
        assert [limit.prereq(t, *key) for t in transfers] == [OK] * 6  # type: ignore[arg-type]
        for refused in transfers[3:]:  # a GOAWAY after 3: libcurl sends the other 3 again elsewhere
            assert limit.prereq(refused, "127.0.0.1", 49999) == OK  # type: ignore[arg-type]
            assert refused.sends == 2 and refused.resent == [REFUSED]
        for answered in transfers[:3]:
            answered.done = True
            limit.ended(answered)  # type: ignore[arg-type]
        for refused in transfers[3:]:
            refused.done = True
            limit.ended(refused)  # type: ignore[arg-type]
    assert answers_on_a_new_connection(limit, connections, 40012, 4) == [OK, OK, OK, HOLD]


def test_requests_lost_to_an_idle_close_teach_no_limit(connections: Connections) -> None:
    """A request written on a connection the server had just closed when idle (keep-alive close,
    HTTP/2 idle timeout) is sent again by libcurl too: that says nothing of a request limit."""
    limit, _ = make(0, connections)
    for port in (40030, 40031, 40032):
        key = connections.open(port)
        answered, raced = Transfer(opened=1), Transfer()
        assert limit.prereq(answered, *key) == OK  # type: ignore[arg-type]
        answered.done = True
        limit.ended(answered)  # type: ignore[arg-type]
        assert limit.prereq(raced, *key) == OK  # type: ignore[arg-type]  # the connection idle: not busy
        assert limit.prereq(raced, "127.0.0.1", 49998) == OK  # type: ignore[arg-type]  # sent again
        assert raced.resent == [
            "NETWORK: the reused connection closed before answering (libcurl sent the request again)"]
        raced.done = True
        limit.ended(raced)  # type: ignore[arg-type]
    assert answers_on_a_new_connection(limit, connections, 40033, 5) == [OK] * 5  # nothing learned


def test_requests_sent_again_after_a_reset_say_so_and_teach_no_limit(connections: Connections) -> None:
    """A connection reset (here: its proxy's, marked by the hand-over) may have destroyed
    answers the server gave: the requests libcurl sends again say "reset", not GOAWAY, and with
    none refused by a GOAWAY nothing is learned (a relay's reset falls at any count)."""
    limit, _ = make(0, connections)
    for port in (40040, 40041):
        key = connections.open(port)
        transfers = [Transfer(opened=1)] + [Transfer() for _ in range(5)]
        assert [limit.prereq(t, *key) for t in transfers] == [OK] * 6  # type: ignore[arg-type]
        for cut in transfers[3:]:
            cut.reset = "the proxy's, after what it sent was read"
            assert limit.prereq(cut, "127.0.0.1", 49997) == OK  # type: ignore[arg-type]
            assert cut.resent == ["NETWORK: Connection reset by peer (the proxy's, after what it sent was read; "
                                  "libcurl sent the request again)"] and cut.reset == ""
        for t in transfers:
            t.done = True
            limit.ended(t)  # type: ignore[arg-type]
    assert answers_on_a_new_connection(limit, connections, 40042, 5) == [OK] * 5  # nothing learned


def test_requests_a_reset_destroyed_count_as_accepted(connections: Connections) -> None:
    """The server allows 5: its GOAWAY refused the sixth request (sent again first, as libcurl
    reads the GOAWAY before the close after it), then the proxy reset the connection and libcurl
    sent again two the server had answered: the limit learned is 5, not 3 (through squid nearly
    every connection that met a GOAWAY was reset; learning must not lose those)."""
    limit, _ = make(0, connections)
    for port in (40050, 40051):
        key = connections.open(port)
        transfers = [Transfer(opened=1)] + [Transfer() for _ in range(5)]
        assert [limit.prereq(t, *key) for t in transfers] == [OK] * 6  # type: ignore[arg-type]
        *answered, cut1, cut2, refused = transfers
        assert limit.prereq(refused, "127.0.0.1", 49990) == OK  # type: ignore[arg-type]
        limit.mark_reset(key, "the proxy's, after what it sent was read")
        for t in (cut1, cut2):
            assert limit.prereq(t, "127.0.0.1", 49990) == OK  # type: ignore[arg-type]
            assert "reset by peer" in t.resent[0]
        for t in answered:
            t.done = True
            limit.ended(t)  # type: ignore[arg-type]
    assert answers_on_a_new_connection(limit, connections, 40052, 6) == [OK] * 5 + [HOLD]


def test_waiting_transfers_go_again_when_a_learned_limit_was_dropped(connections: Connections) -> None:
    """A transfer held back waits for its connection's transfers; if the limit it was held at is
    dropped meanwhile, the last transfer off the connection still sends it again."""
    limit, _ = make(2, connections)
    key = connections.open(40020)
    first, second, replacing, held = Transfer(opened=1), Transfer(), Transfer(), Transfer()
    limit.prereq(first, *key)  # type: ignore[arg-type]
    limit.prereq(second, *key)  # type: ignore[arg-type]
    for transfer in (replacing, held):
        assert limit.prereq(transfer, *key) == HOLD  # type: ignore[arg-type]
    assert not limit.wait(replacing)  # type: ignore[arg-type]
    assert limit.wait(held)  # type: ignore[arg-type]
    limit.limit = 0  # (stands for a learned limit dropped)
    for t in (first, second):
        t.done = True
    assert limit.ended(first) == []  # type: ignore[arg-type]
    assert limit.ended(second) == [held]  # type: ignore[arg-type]

