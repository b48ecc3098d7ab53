"""Issue 12 §2: a fetch cancelled at any stage loses no pool slot, leaves no connection counted
that does not exist and no socket open that the pool does not count.

Each case holds one stage open for real (a relay holding a direction of the stream, a port where
TCP connects hang, a DNS server that holds its queries, a full pool, a Retry-After), waits until
the fetch is provably in that stage, cancels the task, and then checks the invariant
(support.sockets): after one upkeep period every pool's connections_open equals the OS's sockets
to its peers, nothing is active or waiting, and the pool still serves max_connections requests
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable

import pytest
from enginekit import assert_engine_invariant, make_settings
from fetchpool.config import PoolLimits, RetryPolicy
from fetchpool.engine import Engine, FetchSpec
from fetchpool.engine.batch import run_batch
from support import AppServer, Certs, Nginx, Tinyproxy
from support.blackhole import SynBlackHole
from support.chaos import Fault, Relay, first
from support.resolver import HoldingDns, in_private_resolver
from support.sockets import tcp_sockets

UPLOAD = 32 * 1024 * 1024  # far more than a loopback socket's buffers hold

async def _cancel(task: asyncio.Task[object], stage: str) -> None:
    """Cancel a fetch that must still be in ``stage``, and wait (bounded) until it has ended.

    Callers then drop their reference to the task: a cancelled task keeps its CancelledError,
    whose traceback keeps the fetch's frames (and whatever sockets they hold) alive, which a
    server would not do.
    """
    assert not task.done(), f"the fetch ended before it was cancelled {stage}: {task.result()}"
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=10)
    assert done, f"the fetch cancelled {stage} had not ended 10 s later"
    assert task.cancelled(), f"the fetch cancelled {stage} returned instead: {task.result()}"

async def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)

async def test_cancelled_while_waiting_for_admission(make_engine: ..., certs: Certs, app_server: AppServer) -> None:
    limits = PoolLimits(max_connections=1, max_keepalive_connections=1, max_requests=1, pool_timeout=3)
    engine: Engine = await make_engine(make_settings(certs, limits=limits))
    holder = asyncio.create_task(engine.fetch(FetchSpec(url=f"{app_server.http_url}/delay?s=30&hold=admission")))
    await _until(lambda: engine.snapshots()[0].requests_active == 1, "the first fetch to take the only slot")
    waiter = asyncio.create_task(engine.fetch(FetchSpec(url=f"{app_server.http_url}/delay?s=0&wait=admission")))
    await _until(lambda: engine.snapshots()[0].requests_waiting == 1, "the second fetch to wait for admission")
    await _cancel(waiter, "while waiting for admission")
    del waiter
    await _cancel(holder, "while waiting for headers (it held the slot)")
    del holder
    await assert_engine_invariant(engine, [app_server.http_url], app_server, "a cancellation in admission")

async def test_cancelled_while_waiting_for_a_connection(
    make_engine: ..., certs: Certs, app_server: AppServer, transport: str
) -> None:
    # Admitted (max_requests 2), but the only connection is busy (HTTP/1.1): the second fetch
    # waits in the transport's queue for it. (curl admits at most max_connections, 1 here: its
    # second fetch waits in admission, CurlTransport.requests_cap.)
    admitted = 1 if transport == "curl" else 2
    limits = PoolLimits(max_connections=1, max_keepalive_connections=1, max_requests=2, pool_timeout=3)
    engine: Engine = await make_engine(make_settings(certs, limits=limits))
    holder = asyncio.create_task(engine.fetch(FetchSpec(url=f"{app_server.http_url}/delay?s=30&hold=connection")))
    await _until(lambda: engine.snapshots()[0].connections_active == 1, "the first fetch to take the only connection")
    waiter = asyncio.create_task(engine.fetch(FetchSpec(url=f"{app_server.http_url}/delay?s=0&wait=connection")))
    await _until(lambda: engine.snapshots()[0].requests_active == admitted, "the second fetch to be admitted")
    await asyncio.sleep(0.2)
    stats = engine.snapshots()[0]
    assert (stats.connections_open, stats.requests_active, stats.requests_waiting) == (1, admitted, 2 - admitted), stats
    await _cancel(waiter, "while waiting for a connection")
    del waiter
    await _cancel(holder, "while waiting for headers (it held the connection)")
    del holder
    await assert_engine_invariant(engine, [app_server.http_url], app_server, "a cancellation in the connection queue")


def test_cancelled_during_dns_resolution(certs: Certs, app_server: AppServer) -> None:
    # The guard resolves the name through the system resolver, here a DNS server that holds
    # every query: the fetch is provably inside getaddrinfo when the query arrives.
    name = "slow-dns.fetchpool.test"

    async def scenario(dns: HoldingDns) -> None:
        async with Engine(make_settings(certs)) as engine:
            task = asyncio.create_task(engine.fetch(FetchSpec(url=f"http://{name}:{app_server.http_port}/")))
            await asyncio.to_thread(dns.wait_query, name)
            await _cancel(task, "during DNS resolution")
            del task
            dns.release()
            await assert_engine_invariant(engine, [app_server.http_url], app_server, "a cancellation in DNS")

    with HoldingDns() as dns:
        in_private_resolver(dns.address, lambda: asyncio.run(scenario(dns)))

@pytest.mark.parametrize("route", ["direct", "proxy"])
async def test_cancelled_during_tcp_connect(
    route: str, make_engine: ..., certs: Certs, app_server: AppServer, tinyproxy: Tinyproxy
) -> None:
    # Direct: the target's port drops SYNs; through a proxy: the proxy's port does, until it is
    # opened (relaying to tinyproxy) for the probe.
    with SynBlackHole() as hole:
        hole_url = f"http://{hole.address[0]}:{hole.port}"
        proxy = hole_url if route == "proxy" else None
        url = f"{app_server.http_url}/" if proxy else f"{hole_url}/"
        engine: Engine = await make_engine(make_settings(certs, proxy=proxy))
        task = asyncio.create_task(engine.fetch(FetchSpec(url=url)))
        await _until(lambda: any(s.status == "SYN_SENT" for s in tcp_sockets([hole.address])), "a SYN_SENT socket")
        await _cancel(task, "during the TCP connect")
        del task
        hole.open(("127.0.0.1", tinyproxy.port))
        await assert_engine_invariant(engine, [hole_url], app_server, f"a cancellation in TCP connect ({route})")

@dataclasses.dataclass(frozen=True)
class Held:
    """A fetch through a relay that holds ``fault.stage``; ``route`` is direct or a proxy kind
    (the relay then sits between the engine and the proxy)."""

    fault: Fault
    route: str
    target: str  # nginx-h1 | nginx-h2 | app-h1 | app-h2
    path: str
    method: str = "GET"

    @property
    def id(self) -> str:
        return f"{self.fault.stage}-{self.route}-{self.target}"

HELD = [
    Held(Fault("proxy", "hold"), "squid", "nginx-h2", "/small.html"),
    Held(Fault("proxy", "hold"), "socks5", "nginx-h2", "/small.html"),
    Held(Fault("tls", "hold"), "direct", "nginx-h2", "/small.html"),
    Held(Fault("tls", "hold"), "squid", "nginx-h2", "/small.html"),
    # The relay stops reading the client after 4 KiB of its request: a large upload blocks.
    Held(Fault("request", "hold", 4096), "direct", "app-h1", "/echo", "POST"),
    Held(Fault("request", "hold", 4096), "direct", "app-h2", "/echo", "POST"),
    Held(Fault("headers", "hold"), "direct", "nginx-h1", "/small.html"),
    Held(Fault("headers", "hold"), "direct", "nginx-h2", "/small.html"),
    Held(Fault("headers", "hold"), "squid", "nginx-h2", "/small.html"),
    Held(Fault("body", "hold", 1000), "direct", "nginx-h1", "/large.html"),
    Held(Fault("body", "hold", 1000), "direct", "nginx-h2", "/large.html"),
    Held(Fault("body", "hold", 1000), "socks5", "nginx-h2", "/large.html"),
]

@pytest.mark.parametrize("case", HELD, ids=lambda case: case.id)
async def test_cancelled_at_a_held_stage(
    case: Held, make_engine: ..., proxy_url: ..., certs: Certs, nginx: Nginx, app_server: AppServer
) -> None:
    server = nginx if case.target.startswith("nginx") else app_server
    base = server.https_url if case.target.endswith("h2") else server.http_url
    via = proxy_url(case.route)
    upstream = ("127.0.0.1", int(via.rsplit(":", 1)[1])) if via else ("127.0.0.1", int(base.rsplit(":", 1)[1]))
    with Relay(upstream, first(case.fault)) as relay:
        scheme = "socks5" if case.route == "socks5" else "http"
        proxy = relay.url(scheme) if via else None
        url = base + case.path if via else relay.url(base.split(":", 1)[0], case.path)
        engine: Engine = await make_engine(make_settings(certs, proxy=proxy))
        body = b"u" * UPLOAD if case.method == "POST" else b""
        task = asyncio.create_task(engine.fetch(FetchSpec(url=url, method=case.method, body=body)))
        logs = await relay.held()
        assert logs[0].injected is not None and logs[0].injected.stage == case.fault.stage, logs
        await _cancel(task, f"while the relay held the {case.fault.stage} stage")
        del task
        await assert_engine_invariant(engine, [relay.url("http")], app_server, f"a cancellation in {case.id}")

async def test_cancelled_during_a_retry_back_off(make_engine: ..., certs: Certs, app_server: AppServer) -> None:
    engine: Engine = await make_engine(make_settings(certs, retry=RetryPolicy(attempts=3, max_retry_after=60)))
    task = asyncio.create_task(engine.fetch(FetchSpec(url=f"{app_server.http_url}/status/503?retry_after=30")))
    # The engine counts a retry just before it sleeps the back-off.
    await _until(lambda: engine.snapshots()[0].retries_total == 1, "the 503 to start a 30 s back-off")
    await _cancel(task, "during the retry back-off")
    del task
    await assert_engine_invariant(engine, [app_server.http_url], app_server, "a cancellation in a back-off")

async def test_cancelled_during_a_redirect(
    make_engine: ..., certs: Certs, nginx: Nginx, app_server: AppServer
) -> None:
    # The app redirects to another origin (a relay to nginx) whose response the relay holds.
    with Relay(("127.0.0.1", nginx.http_port), first(Fault("headers", "hold"))) as relay:
        engine: Engine = await make_engine(make_settings(certs))
        hop = relay.url("http", "/small.html")
        task = asyncio.create_task(engine.fetch(FetchSpec(url=f"{app_server.http_url}/redirect-to?to={hop}")))
        await relay.held()
        await _cancel(task, "on the second hop of a redirect")
        del task
        await assert_engine_invariant(engine, [relay.url("http")], app_server, "a cancellation in a redirect")


async def test_batches_cancelled_as_their_bodies_end_leave_no_connection_active(
    make_engine: ..., certs: Certs, app_server: AppServer
) -> None:
    """A consumer that stops a batch of 100 KB fetches over HTTP/1.1 at its first result cancels
    the others at every point of their bodies, some inside the release of a connection whose body
    just ended. httpcore guards that release with an anyio shield, which asyncio's Task.cancel()
    passes: such connections stayed ACTIVE with no request, for good (a fresh user's try of a
    cancelled FetchMany: 1-8 more after each of four calls)."""
    engine: Engine = await make_engine(make_settings(certs))
    for k in range(6):
        async def items(k: int = k) -> AsyncIterator[tuple[int, FetchSpec]]:
            for i in range(40):
                yield i, FetchSpec(url=f"{app_server.http_url}/bytes?n=100000&k={k}&i={i}")

        async with contextlib.aclosing(run_batch(engine, items(), 20)) as batch:
            async for _ in batch:
                break
    await assert_engine_invariant(engine, [app_server.http_url], app_server, "six batches cancelled mid-body",
                                  probe=False)
    assert engine.snapshots()[0].connections_active == 0, engine.snapshots()[0]
