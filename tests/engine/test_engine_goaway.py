"""Issue 12 §1: a whole site in one batch against nginx over TLS/HTTP/2, whose connections end
with a graceful GOAWAY after ``keepalive_requests`` streams, directly and through every proxy kind.

No result is lost to a GOAWAY: every page comes back 200 with the file's exact bytes; nginx
served each URI exactly once (a request goes twice only when the first send provably never got
an answer, and in this fault-free run none can be, except where a relay destroys answers: see
RESETTING_RELAYS); the requests waiting for a connection that
went away share the next one, so connections opened stay close to pages / keepalive_requests;
and the invariant of §2 holds afterwards. All problems of a run are reported together.
"""

from __future__ import annotations

import asyncio
import collections
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from enginekit import ROUTES, assert_engine_invariant, make_settings, summary
from fetchpool.engine import FetchSpec, Outcome
from fetchpool.engine.batch import run_batch
from fetchpool.errors import ErrorKind
from support import AppServer, Certs, Nginx

CONCURRENCY = 64
#: Connections nginx may see beyond pages / keepalive_requests (rounded up), as a fraction of
#: that ideal, plus one: the last connection of a batch may end early, never a burst.
SPARE_CONNECTIONS = 0.1
#: Relays that reset a tunnel when bytes of ours arrive after the server has closed it: tinyproxy
#: and microsocks close their client socket as soon as the server's end is read, whatever they
#: still have to pass on, and the kernel answers our next bytes with a reset that discards it.
#: Packet captures of failing runs showed it: microsocks had passed on 683 KB of nginx's 768 KB
#: when our next request (sent before the GOAWAY could reach us, that GOAWAY being among what was
#: lost) met the closed socket. Answers destroyed so are fetched again by the retry policy. Such a
#: second send is accepted through these relays only, and only when the page's result records a
#: retry after a reset. squid half-closes and drains: through it, and directly, none is accepted
#: (for ``httpcore``; for ``curl`` see resets_answers).
RESETTING_RELAYS = frozenset({"tinyproxy", "socks5"})


def resets_answers(transport: str, route: str) -> bool:
    """Whether ``route``'s relay may destroy answers of ``transport``'s connections at a server's
    close (see RESETTING_RELAYS). Known defect, README "Transports": squid too resets a tunnel
    when bytes of ours reach it after the server's close, destroying what it still held, and
    libcurl writes at every response's headers (curl/handover.py), so through squid curl's
    connections meet it (packet captures showed it); ``httpcore`` writes nothing then."""
    return route in RESETTING_RELAYS or (transport == "curl" and route == "squid")


def resends_after_resets(outcome: Outcome) -> int:
    """How many of ``outcome``'s sends were repeated because the connection was reset."""
    return sum(reason.startswith("NETWORK:") and "reset by peer" in reason for reason in outcome.retry_reasons)


def cut_beyond_the_budget(outcome: Outcome) -> bool:
    """Whether ``outcome`` failed on a reset whose retry the retry budget refused: a relay's
    reset that cut more streams with part of their answer than the budget lets retry at once
    (20 % of the requests in flight). Known defect of curl through a proxy (libcurl writes
    between its reads, and a write that meets the proxy's close resets the tunnel, see
    ``resets_answers``): seen in about one run in ten of the 1,063-page batch through squid or
    SOCKS5, 2 to 5 pages of it."""
    return (outcome.error_kind is ErrorKind.NETWORK and "reset by peer" in outcome.error_message
            and outcome.error_message.endswith("(not retried: the retry budget is spent)"))


def connection_problems(entries: list[dict[str, object]], pages: int, keepalive: int,
                        excused: dict[str, int] | None = None) -> list[str]:
    """Problems of nginx's view of one batch: URIs sent twice (beyond ``excused``: URI -> extra
    sends accepted), more connections than pages need."""
    problems = []
    excused = excused or {}
    sent = collections.Counter(entry["request_uri"] for entry in entries)
    twice = {uri: n for uri, n in sent.items() if n > 1 + excused.get(str(uri), 0)}
    if twice:
        problems.append(f"{len(twice)} pages were sent to nginx more than once though every first send was "
                        f"answered, e.g. {list(twice.items())[:3]}")
    if len(sent) != pages:
        problems.append(f"nginx logged {len(sent)} distinct pages of {pages}")
    per_connection = collections.Counter(entry["connection"] for entry in entries)
    ideal = math.ceil(pages / keepalive)
    allowed = ideal + math.ceil(ideal * SPARE_CONNECTIONS) + 1
    if len(per_connection) > allowed:
        singles = sum(n == 1 for n in per_connection.values())
        problems.append(f"{len(per_connection)} connections for {pages} pages at {keepalive} requests per "
                        f"connection (ideal {ideal}, allowed {allowed}); {singles} served a single request")
    return problems


# nginx: the default keepalive_requests (1000), crossed once by the whole site (~1060 files), as in
# the issue. nginx_goaway: 20, met 26 times by the site's HTML pages (~530; the whole site would
# only double the time a failing run takes).
@pytest.mark.parametrize("origin", ["nginx_goaway", "nginx"])
@pytest.mark.parametrize("route", ROUTES)
async def test_a_site_in_one_batch_survives_every_goaway(
    route: str,
    origin: str,
    transport: str,
    request: pytest.FixtureRequest,
    make_engine: ...,
    proxy_url: ...,
    certs: Certs,
    doc_root: Path,
    doc_files: list[str],
    doc_pages: list[str],
    app_server: AppServer,
) -> None:
    # Known defect, README "Transports": through a proxy, curl's pages may fail on a reset that
    # cut more streams than the retry budget lets retry (``cut_beyond_the_budget``); tolerated.
    curl_defect = transport == "curl" and route != "direct"
    nginx: Nginx = request.getfixturevalue(origin)
    engine = await make_engine(make_settings(certs, proxy=proxy_url(route)))
    run = uuid.uuid4().hex[:12]
    pages = doc_pages if origin == "nginx_goaway" else doc_files
    specs = {page: FetchSpec(url=f"{nginx.https_url}/doc/{page}?run={run}") for page in pages}
    since = nginx.log_offset()

    async def items() -> AsyncIterator[tuple[str, FetchSpec]]:
        for item in specs.items():
            yield item

    outcomes: dict[str, list[Outcome]] = collections.defaultdict(list)
    async with asyncio.timeout(90):
        async for page, outcome in run_batch(engine, items(), CONCURRENCY):
            outcomes[page].append(outcome)

    problems = []
    if sorted(outcomes) != sorted(specs) or any(len(got) != 1 for got in outcomes.values()):
        problems.append(f"{len(outcomes)} of {len(specs)} pages have results, "
                        f"{sum(len(got) > 1 for got in outcomes.values())} more than one")
    results = {page: got[0] for page, got in outcomes.items()}
    failed = [o for o in results.values() if not o.ok or o.status_code != 200]
    if curl_defect:
        failed = [o for o in failed if not cut_beyond_the_budget(o)]
    if failed:
        problems.append(f"{len(failed)} of {len(specs)} pages failed: {summary(failed)}")
    wrong = [page for page, o in results.items() if o.ok and o.body != (doc_root / page).read_bytes()]
    if wrong:
        problems.append(f"{len(wrong)} pages came back with other bytes than the file's, e.g. {wrong[:3]}")
    unexplained = [o.url for o in results.values() if o.attempts != 1 + len(o.retry_reasons)]
    if unexplained:
        problems.append(f"{len(unexplained)} results repeated a send without a reason, e.g. {unexplained[:3]}")
    if {o.http_version for o in results.values() if o.ok} != {"HTTP/2"}:
        problems.append(f"HTTP versions {sorted({o.http_version for o in results.values()})}, not only HTTP/2")
    entries = [e for e in nginx.access_log(since, min_entries=len(specs)) if f"run={run}" in e["request_uri"]]
    excused = {f"/doc/{page}?run={run}": resends_after_resets(o) for page, o in results.items()
               if resets_answers(transport, route)}
    problems += connection_problems(entries, len(specs), nginx.keepalive_requests, excused)
    stats = engine.snapshots()[0]  # the batch's, before the invariant's probe adds its own
    try:
        await assert_engine_invariant(engine, [nginx.https_url], app_server, f"the {route} batch")
    except AssertionError as exc:
        problems.append(str(exc))
    assert not problems, (
        f"{route}, keepalive_requests={nginx.keepalive_requests} (pool: {stats.connections_created_total} "
        f"connections created, {stats.retries_total} resends/retries):\n" + "\n".join(problems)
    )


@pytest.mark.parametrize("route", ROUTES)
async def test_a_servers_request_limit_is_learned_so_its_goaway_refuses_nothing(
    route: str, transport: str, make_engine: ..., proxy_url: ..., certs: Certs, doc_pages: list[str],
    nginx_goaway: Nginx,
) -> None:
    """nginx ends each connection after 20 requests; 64 in flight, the first connections get more
    than that and its GOAWAY refuses the rest (sent again elsewhere). Once two connections ended
    at 20, connections to it take 20 requests each: the next batch has no request refused, and
    no more connections than its pages need. (Without the learning, 20-50 % of the second batch's
    requests were refused, on every route.)"""
    if transport == "curl" and route == "squid":
        # Known defect, README "Transports": through squid nearly every curl connection that met
        # the GOAWAY is then reset (resets_answers), and a request the reset destroyed that is
        # labelled otherwise changes that connection's count, which drops the learned limit:
        # 3 of 100 runs of this case failed (19 requests of the second batch refused), none of
        # 150 through tinyproxy and SOCKS5.
        pytest.skip("curl through squid: a reset after the GOAWAY can blur the count the limit is learned from")
    # Known defect (test_a_site_in_one_batch_survives_every_goaway): through a proxy, curl's
    # pages may fail on a reset that cut more streams than the retry budget lets retry.
    curl_defect = transport == "curl" and route != "direct"
    engine = await make_engine(make_settings(certs, proxy=proxy_url(route)))

    async def batch(pages: list[str]) -> list[Outcome]:
        specs = ((page, FetchSpec(url=f"{nginx_goaway.https_url}/doc/{page}?run={uuid.uuid4().hex[:8]}"))
                 for page in pages)

        async def items() -> AsyncIterator[tuple[str, FetchSpec]]:
            for item in specs:
                yield item

        async with asyncio.timeout(60):
            return [outcome async for _, outcome in run_batch(engine, items(), CONCURRENCY)]

    before_first = nginx_goaway.log_offset()
    def failures(outcomes: list[Outcome]) -> list[str]:
        return [o.error_message for o in outcomes if not o.ok and not (curl_defect and cut_beyond_the_budget(o))]

    first = await batch(doc_pages[:200])  # ten connections: the limit is learned by the third
    assert failures(first) == []
    first_connections = collections.Counter(
        entry["connection"] for entry in nginx_goaway.access_log(before_first, min_entries=len(first)))
    since = nginx_goaway.log_offset()
    second = await batch(doc_pages[200:400])
    assert failures(second) == []
    refused = [o.url for o in second if any(r.startswith("GOAWAY") for r in o.retry_reasons)]
    assert refused == [], f"{len(refused)} of {len(second)} requests refused by a GOAWAY, e.g. {refused[:3]}"
    entries = nginx_goaway.access_log(since, min_entries=len(second))
    # The first batch's last connection may still have room, and the second batch fills it first:
    # count what each connection had served before (its lowest $connection_requests here, less one).
    served_before: dict[int, int] = {}
    for entry in entries:
        before = entry["connection_requests"] - 1
        served_before[entry["connection"]] = min(served_before.get(entry["connection"], before), before)
    per_connection = collections.Counter(entry["connection"] for entry in entries)
    needed = math.ceil((len(entries) + sum(served_before.values())) / nginx_goaway.keepalive_requests)
    # A relay's reset (see test_a_site_in_one_batch_survives_every_goaway) may cut a connection short.
    cut = sum(map(resends_after_resets, second)) if resets_answers(transport, route) else 0
    # Known gap, README "Transports": when curl retires a connection at its limit, the request it
    # holds back goes on a new connection at once, and libcurl may open one more of its own for
    # the requests sent again after it (seen by the pre-request callback: a new connection
    # without FRESH_CONNECT); both fill up, but the batch's last two connections may both be
    # partial: one connection more than the pages need (2 runs of 16 here).
    spare = 1 if transport == "curl" else 0
    resent = [(o.url, o.retry_reasons) for o in first + second if o.retry_reasons]
    assert needed <= len(per_connection) <= needed + cut + spare, (
        f"second batch {per_connection}, served before it {served_before}; first batch {first_connections}; "
        f"{len(resent)} resent, not for a GOAWAY: {[r for r in resent if not r[1][0].startswith('GOAWAY')][:5]}")
