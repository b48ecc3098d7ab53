"""The OS's view of a process's TCP sockets (psutil), and the pool invariant checked against it.

The invariant (issue 12, §2): once a workload has ended and one upkeep period has passed,

- every pool's ``connections_open`` equals the number of the process's open TCP sockets to
  that pool's peers (the targets for a direct pool, the proxy for a proxied one);
- ``requests_active`` and ``requests_waiting`` are 0, and so are ``connections_active`` and
  ``http2_streams`` (a connection busy with no request in flight is one the pool lost).

A socket counts while the process holds a descriptor for it, whatever its state (a
``CLOSE_WAIT`` socket the pool forgot is a leak as much as an ``ESTABLISHED`` one); sockets the
process already closed (``TIME_WAIT``, ``FIN_WAIT2``) have no descriptor and do not count.
Stats may be an engine's ``PoolSnapshot`` or a ``fetchpool.v1.PoolStats`` message: both
carry the fields read here (PoolStatsLike).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

#: (IP literal, port); IPv4-mapped IPv6 addresses are compared as their IPv4 address.
Peer = tuple[str, int]


class PoolStatsLike(Protocol):
    """What the invariant reads of a pool's stats."""

    @property
    def pool(self) -> str: ...

    @property
    def connections_open(self) -> int: ...

    @property
    def requests_active(self) -> int: ...

    @property
    def requests_waiting(self) -> int: ...

    @property
    def connections_active(self) -> int: ...

    @property
    def http2_streams(self) -> int: ...

    @property
    def limits(self) -> Any: ...


def _ip(address: str) -> str:
    return address.removeprefix("::ffff:")


def tcp_sockets(peers: Iterable[Peer], pid: int | None = None) -> list[psutil._common.pconn]:
    """The open TCP sockets of process ``pid`` (None: this one) connected to one of ``peers``.

    Listening sockets and sockets without a remote address are never included. Raises
    psutil.NoSuchProcess when the process is gone.
    """
    wanted = {(_ip(host), port) for host, port in peers}
    process = psutil.Process(os.getpid() if pid is None else pid)
    return [
        conn
        for conn in process.net_connections(kind="tcp")
        if conn.raddr and (_ip(conn.raddr.ip), conn.raddr.port) in wanted
    ]


def describe(sockets: Iterable[psutil._common.pconn]) -> str:
    """``"3 ESTABLISHED, 1 CLOSE_WAIT"``: the sockets' states, counted (for failure messages)."""
    states = collections.Counter(conn.status for conn in sockets)
    return ", ".join(f"{count} {state}" for state, count in sorted(states.items())) or "none"


@dataclass(frozen=True, slots=True)
class PoolCheck:
    """One pool's stats beside the OS's sockets to its peers."""

    pool: str
    connections_open: int
    sockets: int
    socket_states: str
    requests_active: int
    requests_waiting: int
    connections_active: int
    http2_streams: int

    @property
    def holds(self) -> bool:
        busy = (self.requests_active, self.requests_waiting, self.connections_active, self.http2_streams)
        return self.connections_open == self.sockets and not any(busy)

    def __str__(self) -> str:
        return (
            f"pool {self.pool}: connections_open={self.connections_open}, the OS has {self.sockets} socket(s) to "
            f"its peers ({self.socket_states}); requests_active={self.requests_active}, "
            f"requests_waiting={self.requests_waiting}, connections_active={self.connections_active}, "
            f"http2_streams={self.http2_streams}"
        )


def check_pools(
    pools: Iterable[PoolStatsLike], peers_of: Mapping[str, Collection[Peer]], pid: int | None = None
) -> list[PoolCheck]:
    """Each pool's stats beside the sockets of process ``pid`` to ``peers_of[pool]``.

    Raises KeyError for a pool whose peers are not given (a test must name them all).
    """
    checks = []
    for stats in pools:
        sockets = tcp_sockets(peers_of[stats.pool], pid)
        checks.append(
            PoolCheck(
                pool=stats.pool,
                connections_open=stats.connections_open,
                sockets=len(sockets),
                socket_states=describe(sockets),
                requests_active=stats.requests_active,
                requests_waiting=stats.requests_waiting,
                connections_active=stats.connections_active,
                http2_streams=stats.http2_streams,
            )
        )
    return checks


def violations(checks: Iterable[PoolCheck]) -> list[str]:
    """The checks that break the invariant, as messages (empty when it holds)."""
    return [str(check) for check in checks if not check.holds]


@dataclass(frozen=True, slots=True)
class Served:
    """One result of the full-width probe: ``error`` is the error kind's name ("" for a
    response), ``detail`` the error message or the response body."""

    status: int
    error: str
    detail: str


class StatsReader(Protocol):
    async def __call__(self) -> Sequence[PoolStatsLike]: ...


class WidthProbe(Protocol):
    async def __call__(self, pool: str, count: int) -> Sequence[Served]:
        """Send ``count`` requests at once through ``pool`` to a barrier (support.app's
        /barrier): each is answered 200 only once all ``count`` are at the target together."""
        ...


#: Seconds a probe's barrier waits for all its requests (then it answers 504).
BARRIER_S = 3.0
#: Seconds the pools get to end their last requests before the invariant is checked.
SETTLE_S = 10.0
#: Seconds the invariant keeps being polled after it failed, to say in the failure whether it
#: converges later (a slow clean-up) or never (a leak). It failed already either way.
LATE_LOOK = 2.0


async def assert_invariant(
    read_stats: StatsReader,
    peers_of: Mapping[str, Collection[Peer]],
    *,
    upkeep: float,
    pid: int | None = None,
    probe: WidthProbe | None = None,
    what: str = "",
) -> None:
    """Assert the invariant of issue 12 §2 once the workload has ended (call it right after).

    Waits for every pool to have no request active or waiting (at most SETTLE_S seconds), then
    one upkeep period (``upkeep`` seconds, plus half of it as a margin), compares every
    pool's stats with the sockets of process ``pid`` (None: this one) to ``peers_of[pool]``,
    then, with ``probe``, checks that every pool still serves ``max_connections`` requests at
    once (all of them at the target together, none failing, none POOL_TIMEOUT), so no slot or
    connection was lost. ``what`` names the workload in failure messages.
    """
    label = f" after {what}" if what else ""
    # The workload has ended for the caller; the process under test may still be ending its
    # requests (cancellations it has yet to see on a loaded machine). A slot lost for good never
    # comes back: that fails here.
    settled = time.monotonic() + SETTLE_S
    while busy := [p.pool for p in await read_stats() if p.requests_active or p.requests_waiting]:
        assert time.monotonic() < settled, f"requests still in pools {busy} {SETTLE_S:g} s{label}"
        await asyncio.sleep(0.1)
    await asyncio.sleep(upkeep * 1.5)
    pools = await read_stats()
    broken = violations(check_pools(pools, peers_of, pid))
    if broken:
        started = time.monotonic()
        late: list[str] = broken
        while late and time.monotonic() - started < LATE_LOOK:
            await asyncio.sleep(0.25)
            late = violations(check_pools(await read_stats(), peers_of, pid))
        fate = (f"{LATE_LOOK:g} s later still: {'; '.join(late)}" if late
                else f"(it converged only {time.monotonic() - started:.1f} s later)")
        raise AssertionError(
            f"pool stats do not match the OS {upkeep * 1.5:g} s{label}: {'; '.join(broken)}. {fate}"
        )
    if probe is None:
        return
    for stats in pools:
        width = stats.limits.max_connections
        results = await probe(stats.pool, width)
        failed = collections.Counter(r.error or f"HTTP {r.status}" for r in results if r.error or r.status != 200)
        example = next((r.detail for r in results if r.error or r.status != 200), "")
        assert len(results) == width and not failed, (
            f"pool {stats.pool} of max_connections {width} no longer serves {width} requests at once{label}: "
            f"{sum(failed.values())} of {len(results)} failed ({dict(failed)}; e.g. {example[:200]!r})"
        )
