"""Property-based tests: random request fields (URLs, methods, headers, bodies, sizes, timeouts,
flags) thrown at the gRPC API of a real service. Never a crash (no INTERNAL error, no RPC error,
the process stays up and healthy), always exactly one result per request.

Hosts are drawn so that nothing can leave loopback: loopback spellings, names under .invalid,
or junk with a character fetchpool refuses in a host. Belt and braces, the service denies every
address outside 127.0.0.0/8 and ::1 (deny entries win over allow entries), so even a random name
that resolved could not be connected to. Paths are chosen among the hostile servers' fast ones.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from fetchpool.v1 import fetch_pb2 as pb
from harness import SERVING, Caller, running
from hostile import HostileServers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Certs

K = pb.FetchError
INT64 = st.integers(-(2**63), 2**63 - 1)
#: Durations: protobuf's valid range is +-315,576,000,000 s; beyond it a Duration still serializes.
DURATION_SECONDS = st.one_of(st.integers(-5, 5), st.integers(-(2**63), 2**63 - 1), st.integers(0, 400_000_000_000))
NANOS = st.one_of(st.just(0), st.integers(-999_999_999, 999_999_999), st.integers(-(2**31), 2**31 - 1))
FAST_PATHS = ["/ok", "/record", "/gzip-ok", "/zeros?n=100", "/headers-many?n=10", "/redirect-self",
              "/redirect-inf", "/nowhere", ""]
SETTINGS = settings(
    max_examples=150, deadline=None, database=None, report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _complement(keep: str) -> list[str]:
    whole = ipaddress.ip_network("::/0" if ":" in keep else "0.0.0.0/0")
    return [str(net) for net in whole.address_exclude(ipaddress.ip_network(keep))]  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fuzzed(certs: Certs) -> Iterator[Caller]:
    deny = ",".join(_complement("127.0.0.0/8") + _complement("::1/128"))
    with running(certs, "--allow-targets", "127.0.0.0/8,::1/128", "--deny-targets", deny,
                 "--request-timeout", "10", "--max-request-timeout", "20") as (_, caller):
        yield caller


@st.composite
def urls(draw: st.DrawFn, hostile: HostileServers) -> str:
    kind = draw(st.sampled_from(["hostile", "hostile", "hostile", "tls", "h2", "refused", "host", "text"]))
    if kind == "text":  # anything without an authority: INVALID_URL
        return draw(st.text(max_size=60).filter(lambda s: "//" not in s and "\\\\" not in s))
    tail = draw(st.sampled_from(FAST_PATHS)) + draw(st.sampled_from(["", "?", "#", "?q="])) + draw(
        st.text(st.characters(codec="utf-8", exclude_characters="#?/\\"), max_size=20)
    )
    if kind == "hostile":
        host = draw(st.sampled_from(["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
        return hostile.http(tail if tail.startswith("/") else "/" + tail, host)
    if kind == "tls":
        return hostile.tls(draw(st.sampled_from(sorted(hostile.tls_ports))), "/" + tail.lstrip("/"))
    if kind == "h2":
        return hostile.h2("/ok") + draw(st.sampled_from(["", "?x=1"]))
    if kind == "refused":
        return f"http://127.0.0.1:{hostile.refused_port}/{tail.lstrip('/')}"
    scheme = draw(st.sampled_from(["http", "https", "ftp", "HTTP", "", "h t t p", "javascript"]))
    port = draw(st.one_of(st.just(""), st.sampled_from([":0", ":65536", ":99999", ":-1", ":abc", ":"]),
                          st.just(f":{hostile.http_port}")))
    host = draw(st.one_of(
        st.sampled_from(["127.0.0.1", "[::1]", "localhost", "no-such-host.invalid", "[::1", "::1", "[]", "",
                         "0x7f.1", "127.0.0.1.", "[fe80::1%25lo]", "xn--.invalid", "a.b.c.invalid"]),
        st.builds(lambda a, c, b: a + c + b, st.text(max_size=8), st.sampled_from(list('|{}`\\"')),
                  st.text(max_size=8)),
    ))
    return f"{scheme}://{host}{port}/{tail.lstrip('/')}"


HEADER_NAMES = st.one_of(
    st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade", "Expect", "TE",
                     "Accept-Encoding", "Range", "Cookie", "Authorization", "Proxy-Authorization", "X-Ok", ":path",
                     ""]),
    st.text(max_size=20),
)
HEADER_VALUES = st.one_of(
    st.sampled_from(["chunked", "close", "h2c", "100-continue", "gzip, br", "bytes=0-0", "-1", "1", "999999",
                     "keep-alive, Upgrade", "trailers", ""]),
    st.text(max_size=40),
)


@st.composite
def requests(draw: st.DrawFn, hostile: HostileServers) -> pb.FetchRequest:
    request = pb.FetchRequest(
        id=draw(st.text(max_size=12)),
        url=draw(urls(hostile)),
        method=draw(st.one_of(st.sampled_from(["", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH",
                                               "get", "CONNECT", "TRACE"]), st.text(max_size=10))),
        headers=[pb.Header(name=n, value=v) for n, v in draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES),
                                                                       max_size=4))],
        body=draw(st.one_of(st.just(b""), st.binary(max_size=2048))),
        max_body_bytes=draw(st.one_of(st.integers(-5, 200), INT64)),
        session_key=draw(st.text(max_size=10)),
        tls_insecure_skip_verify=draw(st.booleans()),
    )
    if draw(st.booleans()):
        request.timeout.seconds = draw(DURATION_SECONDS)
        request.timeout.nanos = draw(NANOS)
    if draw(st.booleans()):
        request.follow_redirects = draw(st.booleans())
    return request


def _check(results: list[pb.FetchResult], sent: list[pb.FetchRequest]) -> None:
    assert sorted(r.index for r in results) == list(range(len(sent)))
    for result in results:
        request = sent[result.index]
        assert result.id == request.id
        assert result.error.kind != K.INTERNAL, (request, result.error.message)
        if result.HasField("error"):
            assert result.error.kind != K.KIND_UNSPECIFIED and result.error.message, result
        else:
            assert 100 <= result.status_code <= 599, result


@SETTINGS
@given(data=st.data(), concurrency=st.one_of(st.just(0), st.integers(1, 4), st.integers(0, 2**32 - 1)))
def test_random_batches_get_one_result_each(
    fuzzed: Caller, hostile: HostileServers, data: st.DataObject, concurrency: int
) -> None:
    batch = data.draw(st.lists(requests(hostile), min_size=1, max_size=6))
    _check(fuzzed.fetch_many(batch, concurrency=concurrency, timeout=60), batch)
    fuzzed.wait_pool_clean(timeout=5)  # nothing of this batch stays checked out


@SETTINGS
@given(data=st.data())
def test_random_single_fetches_and_streams(fuzzed: Caller, hostile: HostileServers, data: st.DataObject) -> None:
    single = data.draw(requests(hostile))
    _check([fuzzed.fetch(single, timeout=60)], [single])
    stream = data.draw(st.lists(requests(hostile), min_size=0, max_size=4))
    _check(list(fuzzed.fetch_stub.FetchStream(iter(stream), timeout=60)), stream)
    fuzzed.wait_pool_clean(timeout=5)


@pytest.mark.parametrize(("seconds", "nanos"), [(2**62, 0), (-(2**63), -1), (400_000_000_000, 0), (0, -(2**31))])
def test_an_out_of_range_timeout_fails_its_item_only(
    fuzzed: Caller, hostile: HostileServers, seconds: int, nanos: int
) -> None:
    # Found by the properties above (pinned here: one example, no shrinking): a Duration beyond
    # timedelta's range must not end the call; it is that item's INVALID_ARGUMENT.
    bad = pb.FetchRequest(id="bad", url=hostile.http("/ok"))
    bad.timeout.seconds, bad.timeout.nanos = seconds, nanos
    good = pb.FetchRequest(id="good", url=hostile.http("/ok"))
    results = {r.id: r for r in fuzzed.fetch_many([good, bad])}
    single = fuzzed.fetch(bad)
    assert (results["good"].status_code, results["bad"].error.kind, single.error.kind) == (
        200, K.INVALID_ARGUMENT, K.INVALID_ARGUMENT)


def test_after_the_fuzzing_the_service_is_healthy_and_clean(fuzzed: Caller, hostile: HostileServers) -> None:
    assert fuzzed.health() == SERVING
    fuzzed.wait_pool_clean()
    ok = fuzzed.fetch(pb.FetchRequest(url=hostile.http("/ok")), timeout=10)
    assert (ok.status_code, ok.body) == (200, b"ok")
