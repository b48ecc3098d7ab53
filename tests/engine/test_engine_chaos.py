"""Issue 12, "How it is tested": a relay of our own (support.chaos) between the engine and nginx,
or between the engine and a proxy, resets and half-closes connections at random but seeded points
(connect, proxy, TLS, request, headers, body) while a batch runs.

Under that chaos: every request yields exactly one result; a response is the file's exact bytes;
a failure has a kind that names a network fault (never INTERNAL, TIMEOUT, POOL_TIMEOUT); when
every fault strikes before any response byte, a GET that still failed did so only after all its
attempts; and the invariant of §2 holds after every run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from enginekit import ROUTES, assert_engine_invariant, make_settings, summary
from fetchpool.config import PoolPolicy, RetryPolicy, Timeouts
from fetchpool.engine import Engine, FetchSpec, Outcome
from fetchpool.engine.batch import run_batch
from fetchpool.errors import ErrorKind
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support import AppServer, Certs, Nginx, chaos
from support.chaos import BEFORE_ANY_RESPONSE, BEFORE_RESPONSE, STAGES, Relay

#: Kinds a network fault may end a fetch with (after its retries).
NETWORK_KINDS = {ErrorKind.CONNECT, ErrorKind.PROXY, ErrorKind.NETWORK, ErrorKind.PROTOCOL, ErrorKind.TLS}
# Retries are the property under test, not the budget that caps them (tested elsewhere): a
# budget large enough never to refuse one here, and short back-offs.
RETRY = RetryPolicy(attempts=3, backoff_base=0.01, backoff_max=0.05, budget_ratio=1.0, budget_min=1000)
# A fault must end in an error, never in a wait: short read/connect timeouts make a hang visible.
TIMEOUTS = Timeouts(connect=5, read=5, write=5, request=20)
# Connections retire after a few requests, so the relay sees many (and the retirement runs too).
POLICY = PoolPolicy(max_requests_per_connection=4)
REQUESTS = 200
CONCURRENCY = 16
#: Stages that can end a fetch before any response byte (headers only at offset 0).
EARLY_STAGES = (*BEFORE_RESPONSE, "headers")


def usable_stages(route: str, protocol: str, early: bool) -> tuple[str, ...]:
    """The stages a connection of ``route`` has: no proxy stage direct, nor for plain HTTP through
    an HTTP proxy (forwarded in absolute form, no CONNECT); no TLS over plain HTTP."""
    tunnel = route == "socks5" or (route != "direct" and protocol == "h2")
    return tuple(s for s in (EARLY_STAGES if early else STAGES)
                 if not (s == "proxy" and not tunnel) and not (s == "tls" and protocol == "h1"))


@dataclasses.dataclass(frozen=True)
class Run:
    """One chaos run: ``route`` direct or a proxy kind (the relay then sits in front of the proxy),
    ``protocol`` h2 (TLS, ALPN h2) or h1 (plain HTTP/1.1); ``early``: only faults that strike
    before any response byte."""

    route: str
    protocol: str
    early: bool
    seed: int
    rate: float = 0.5
    stages: tuple[str, ...] = ()  # () = every stage (early: every early one)
    actions: tuple[str, ...] = ("reset", "half_close")
    min_faults: int = 4

    @property
    def id(self) -> str:
        return f"{self.route}-{self.protocol}-{'early' if self.early else 'any'}-seed{self.seed}"


class Servers:
    """What a chaos run needs of the session: a plain class with a short repr, because hypothesis
    prints its test's arguments (a dataclass field by field, the doc site's file list included)."""

    def __init__(
        self, proxy_url: Callable[[str], str | None], certs: Certs, nginx: Nginx, app_server: AppServer,
        site_root: Path, doc_root: Path, doc_files: list[str],
    ) -> None:
        self.proxy_url = proxy_url
        self.certs = certs
        self.nginx = nginx  # nginx_goaway: connections also end gracefully every 20 requests
        self.app_server = app_server
        self.site_root = site_root
        self.doc_root = doc_root
        self.doc_files = doc_files

    def __repr__(self) -> str:
        return "Servers(the session's)"


async def run_chaos(run: Run, servers: Servers) -> None:
    """Run a batch of REQUESTS GETs through a faulting relay; assert the properties; close all."""
    base = servers.nginx.https_url if run.protocol == "h2" else servers.nginx.http_url
    via = servers.proxy_url(run.route)
    upstream = ("127.0.0.1", int((via or base).rsplit(":", 1)[1]))
    # A fault planned for a stage the route has not never fires; too few fired (3 on 13 connections,
    # curl direct, when a sixth went to "proxy") fails the run's floor below.
    stages = run.stages or usable_stages(run.route, run.protocol, run.early)
    plan = chaos.mix(run.rate, stages, run.actions, offsets=BEFORE_ANY_RESPONSE if run.early else None)
    rng = random.Random(run.seed)
    files = {"/small.html": servers.site_root / "small.html", "/large.html": servers.site_root / "large.html"}
    files |= {f"/doc/{page}": servers.doc_root / page for page in rng.sample(servers.doc_files, 40)}
    paths = [rng.choice(list(files)) for _ in range(REQUESTS)]
    tag = uuid.uuid4().hex[:8]
    with Relay(upstream, plan, seed=run.seed) as relay:
        proxy = relay.url("socks5" if run.route == "socks5" else "http") if via else None
        origin = base if via else relay.url(base.split(":", 1)[0])
        specs = {i: FetchSpec(url=f"{origin}{path}?chaos={tag}-{i}") for i, path in enumerate(paths)}
        settings = make_settings(servers.certs, proxy=proxy, retry=RETRY, timeouts=TIMEOUTS, policy=POLICY)
        async with Engine(settings) as engine:

            async def items() -> AsyncIterator[tuple[int, FetchSpec]]:
                for item in specs.items():
                    yield item

            outcomes: dict[int, list[Outcome]] = {i: [] for i in specs}
            async with asyncio.timeout(60):
                async for i, outcome in run_batch(engine, items(), CONCURRENCY):
                    outcomes[i].append(outcome)
            logs = relay.logs()
            faults = chaos.summary(logs)
            assert len(chaos.injected(logs)) >= run.min_faults, f"too few faults to test anything: {faults}"
            counts = {i: len(got) for i, got in outcomes.items() if len(got) != 1}
            assert not counts, f"requests without exactly one result (index: results): {counts}"
            results = {i: got[0] for i, got in outcomes.items()}
            odd = [o for o in results.values() if not o.ok and o.error_kind not in NETWORK_KINDS]
            assert not odd, f"{len(odd)} failures of a kind no network fault explains: {summary(odd)}; {faults}"
            wrong = [i for i, o in results.items()
                     if o.ok and (o.status_code, o.body) != (200, files[paths[i]].read_bytes())]
            assert not wrong, (
                f"{len(wrong)} responses are not the file's bytes (e.g. {specs[wrong[0]].url}: "
                f"{results[wrong[0]].status_code}, {len(results[wrong[0]].body)} bytes); {faults}"
            )
            unexplained = [(o.attempts, o.retry_reasons) for o in results.values()
                           if o.attempts != 1 + len(o.retry_reasons)]
            assert not unexplained, f"sends repeated without a reason (attempts, reasons): {unexplained[:3]}"
            if run.early:
                quitters = [o for o in results.values() if not o.ok and o.attempts < RETRY.attempts]
                assert not quitters, (
                    f"{len(quitters)} GETs failed before any response byte without being sent "
                    f"{RETRY.attempts} times: {summary(quitters)}; {faults}"
                )
            relay.calm()  # the probe's connections go through the relay too
            await assert_engine_invariant(engine, [relay.url("http")], servers.app_server, f"chaos {run.id} ({faults})")


@pytest.fixture
def servers(
    proxy_url: ..., certs: Certs, nginx_goaway: Nginx, app_server: AppServer, site_root: Path, doc_root: Path,
    doc_files: list[str],
) -> Servers:
    return Servers(proxy_url, certs, nginx_goaway, app_server, site_root, doc_root, doc_files)


RUNS = [
    Run("direct", "h2", early=True, seed=1),
    Run("direct", "h1", early=True, seed=2),
    Run("squid", "h2", early=True, seed=3),
    Run("direct", "h2", early=False, seed=4),
    Run("direct", "h1", early=False, seed=5),
    Run("socks5", "h2", early=False, seed=6),
    Run("tinyproxy", "h1", early=False, seed=7),
]


@pytest.mark.parametrize("run", RUNS, ids=lambda run: run.id)
async def test_chaos_every_request_gets_one_result(run: Run, servers: Servers) -> None:
    await run_chaos(run, servers)


#: The hypothesis variant stops drawing new runs after this many seconds (each run is bounded too).
PROPERTY_BUDGET_S = 15.0


@st.composite
def runs(draw: st.DrawFn) -> Run:
    route = draw(st.sampled_from(ROUTES))
    protocol = draw(st.sampled_from(["h1", "h2"]))
    early = draw(st.booleans())
    stages = tuple(draw(st.sets(st.sampled_from(usable_stages(route, protocol, early)), min_size=1)))
    actions = tuple(draw(st.sets(st.sampled_from(["reset", "half_close"]), min_size=1)))
    rate = draw(st.sampled_from([0.3, 0.5, 0.7]))
    seed = draw(st.integers(0, 2**16))
    return Run(route, protocol, early, seed, rate, stages, actions, min_faults=1)


# No shrinking: a chaos run depends on timing as well as on its draw, so a replay may not fail
# again (hypothesis then reports the first failure as flaky, still a failure) and would only
# spend the time budget.
@settings(max_examples=3, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(run=runs())
def test_chaos_property(run: Run, servers: Servers, request: pytest.FixtureRequest) -> None:
    # Sync, one event loop per example: each run starts and closes its own engine and relay.
    budget = request.node.stash.setdefault(_STARTED, time.monotonic())
    if time.monotonic() - budget > PROPERTY_BUDGET_S:
        return  # bounded in time as well as in examples
    asyncio.run(run_chaos(run, servers))


_STARTED = pytest.StashKey[float]()
