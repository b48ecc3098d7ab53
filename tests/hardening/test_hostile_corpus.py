"""The corpus: bad inputs and hostile or broken targets, each with the error kind it must give.

Every case is one FetchRequest sent end to end through a real ``fetchpool serve`` to a real
server of ours on loopback (tests/hardening/hostile.py). The whole corpus runs once per module,
as one FetchMany per service with every case in flight at once; each case is then its own test.
Two services:

  main    loopback allowed (127.0.0.0/8, ::1/128) but 127.0.0.2/32 and host pattern ``localhost``
          denied (a deny entry beats an allow entry)
  strict  the SSRF guard's defaults: loopback refused (the hostile servers also listen on
          127.0.0.2 and ::1, so a guard that let a case through would get a 200, not an error)

Where two kinds are accepted, ``why`` says which library refuses the input before fetchpool's
own check can (then PROTOCOL is what the caller sees). FIN and RST are told apart: a peer that
closes (FIN) before or inside a response is reported by h11/httpcore as a RemoteProtocolError
(PROTOCOL); a reset (RST) is a ReadError (NETWORK).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest
from fetchpool.v1 import fetch_pb2 as pb
from harness import SERVING, Caller, running, socket_count
from hostile import GZIP_OK_BODY, HostileServers
from support import Certs
from support.fetchpool_service import FetchpoolService

K = pb.FetchError
OK = 0
MiB = 1024 * 1024
SLOW = 2.0  # the total deadline of the cases that must end in TIMEOUT, seconds
#: Flags of the two services (see the module docstring).
SERVICES = {
    "main": ("--allow-targets", "127.0.0.0/8,::1/128", "--deny-targets", "localhost,127.0.0.2/32"),
    "strict": ("--ssrf-guard", "true"),
}

UrlFor = Callable[[HostileServers, str], str]


@dataclasses.dataclass(frozen=True, repr=False)
class Case:
    name: str
    url: UrlFor
    kind: int | tuple[int, ...]  # OK (0) = success
    why: str = ""  # why more than one kind is accepted
    service: str = "main"
    timeout: float = 10.0
    max_body_bytes: int = 0
    status: int = 0  # the expected status_code (0: none arrived)
    tweak: Callable[[pb.FetchRequest], None] | None = None
    check: Callable[[pb.FetchResult, HostileServers, str], None] | None = None

    def __repr__(self) -> str:
        return self.name

    @property
    def kinds(self) -> tuple[int, ...]:
        return self.kind if isinstance(self.kind, tuple) else (self.kind,)


# --- URL builders: every case's requests carry k=<case name>, the key of its server-side record.


def _keyed(path: str, key: str) -> str:
    return f"{path}{'&' if '?' in path else '?'}k={key}"


def http(path: str, host: str = "127.0.0.1") -> UrlFor:
    return lambda h, k: h.http(_keyed(path, k), host)


def tls(kind: str, path: str = "/ok") -> UrlFor:
    return lambda h, k: h.tls(kind, _keyed(path, k))


def h2(path: str) -> UrlFor:
    return lambda h, k: h.h2(_keyed(path, k))


def netloc(template: str) -> UrlFor:
    """``template`` with {port} = the hostile HTTP/1.1 port and {k} = the key."""
    return lambda h, k: template.format(port=h.http_port, k=k)


def fixed(url: str) -> UrlFor:
    return lambda h, k: url


def redirect_to(target: Callable[[HostileServers, str], str]) -> UrlFor:
    """A hostile redirect (on 127.0.0.1) to ``target(h, k)``."""
    return lambda h, k: h.http(f"/redirect-to?k={k}&to={quote(target(h, k + '-target'), safe='')}")


# --- Extra checks on top of the kind.


def not_reached(result: pb.FetchResult, h: HostileServers, key: str) -> None:
    """The refused target never saw a request (on any of its addresses)."""
    assert h.recorder.snapshot(key).requests == 0


def redirect_not_followed(result: pb.FetchResult, h: HostileServers, key: str) -> None:
    """The redirector was asked; the forbidden address it pointed to never was."""
    assert h.recorder.snapshot(key).requests == 1
    assert h.recorder.snapshot(key + "-target").requests == 0


def assert_short(message: str) -> None:
    """A message quotes a peer's or a caller's huge input in part, not whole."""
    assert len(message) < 5000, f"{len(message)} characters: {message[:200]}..."


def redirect_refused(result: pb.FetchResult, h: HostileServers, key: str) -> None:
    """A redirect to no fetch target is refused in fetchpool's words, and not listed as followed."""
    assert result.error.message.startswith("redirect to "), result.error.message
    assert list(result.redirects) == []


def hung_up_early(result: pb.FetchResult, h: HostileServers, key: str) -> None:
    """The fetch ended at its deadline, closing the connection, long before the server was done."""
    assert result.timings.total_seconds < SLOW + 5
    record = h.recorder.wait_closed(key, 10)
    assert record.requests >= 1
    assert record.closed_at is not None, "fetchpool kept the connection to the slow server open"
    assert record.gave_up_at is None, "the slow server finished before fetchpool gave up"


def stopped_reading(result: pb.FetchResult, h: HostileServers, key: str) -> None:
    """An endless body: fetchpool hung up after about the limit, not at the server's bound."""
    record = h.recorder.wait_closed(key, 10)
    assert record.closed_at is not None, "fetchpool kept reading or holding the endless response"
    assert record.gave_up_at is None
    assert record.bytes_sent < 64 * MiB


def body(expected: bytes) -> Callable[[pb.FetchResult, HostileServers, str], None]:
    def check(result: pb.FetchResult, h: HostileServers, key: str) -> None:
        assert result.body == expected

    return check


def sent_twice(result: pb.FetchResult, h: HostileServers, key: str) -> None:
    """Graceful GOAWAY before the stream was processed: sent again, on a new connection."""
    assert h.recorder.snapshot(key).requests == 2 and result.attempts >= 2
    assert result.body == b"ok" and result.http_version == "HTTP/2"


def header(name: str, value: str) -> Callable[[pb.FetchRequest], None]:
    def tweak(request: pb.FetchRequest) -> None:
        request.headers.add(name=name, value=value)

    return tweak


def insecure(request: pb.FetchRequest) -> None:
    request.tls_insecure_skip_verify = True


def not_following(request: pb.FetchRequest) -> None:
    request.follow_redirects = False


def negative_body_limit(request: pb.FetchRequest) -> None:
    request.max_body_bytes = -1


LIBRARY_HEADER_LIMIT_H1 = "h11 (inside httpcore) refuses a header block over 100 KiB itself"
LIBRARY_HEADER_LIMIT_H2 = "h2's HPACK decoder refuses a header list over 64 KiB itself (DenialOfServiceError)"

CORPUS: list[Case] = [
    # --- SSRF guard, defaults: loopback refused in every spelling (strict service).
    Case("ssrf-ipv4-literal", http("/ok"), K.FORBIDDEN_TARGET, service="strict", check=not_reached),
    Case("ssrf-localhost", http("/ok", "localhost"), K.FORBIDDEN_TARGET, service="strict", check=not_reached),
    Case("ssrf-decimal-ip", netloc("http://2130706433:{port}/ok?k={k}"), K.FORBIDDEN_TARGET, service="strict",
         check=not_reached),
    Case("ssrf-hex-ip", netloc("http://0x7f000001:{port}/ok?k={k}"), K.FORBIDDEN_TARGET, service="strict",
         check=not_reached),
    Case("ssrf-octal-ip", netloc("http://0177.1:{port}/ok?k={k}"), K.FORBIDDEN_TARGET, service="strict",
         check=not_reached),
    Case("ssrf-short-ip", netloc("http://127.1:{port}/ok?k={k}"), K.FORBIDDEN_TARGET, service="strict",
         check=not_reached),
    Case("ssrf-ipv6-loopback", http("/ok", "::1"), K.FORBIDDEN_TARGET, service="strict", check=not_reached),
    Case("ssrf-ipv6-loopback-long", netloc("http://[0:0:0:0:0:0:0:1]:{port}/ok?k={k}"), K.FORBIDDEN_TARGET,
         service="strict", check=not_reached),
    Case("ssrf-ipv4-mapped-ipv6", netloc("http://[::ffff:127.0.0.1]:{port}/ok?k={k}"), K.FORBIDDEN_TARGET,
         service="strict", check=not_reached),
    # NAT64 (no gateway here: a guard that let these through would give CONNECT, not FORBIDDEN_TARGET).
    Case("ssrf-nat64-well-known-prefix", netloc("http://[64:ff9b::7f00:1]:{port}/ok?k={k}"), K.FORBIDDEN_TARGET,
         service="strict", check=not_reached),
    Case("ssrf-nat64-local-use-prefix", netloc("http://[64:ff9b:1::7f00:1]:{port}/ok?k={k}"), K.FORBIDDEN_TARGET,
         service="strict", check=not_reached),
    Case("ssrf-unspecified-ipv4", http("/ok", "0.0.0.0"), K.FORBIDDEN_TARGET, service="strict", check=not_reached),
    Case("ssrf-unspecified-ipv6", http("/ok", "::"), K.FORBIDDEN_TARGET, service="strict", check=not_reached),
    Case("ssrf-zero", netloc("http://0:{port}/ok?k={k}"), K.FORBIDDEN_TARGET, service="strict", check=not_reached),
    Case("ssrf-https", tls("good"), K.FORBIDDEN_TARGET, service="strict", check=not_reached),
    Case("ssrf-https-skipping-verification", tls("self_signed"), K.FORBIDDEN_TARGET, service="strict",
         tweak=insecure, check=not_reached),
    Case("ssrf-guard-keeps-dns-errors", fixed("http://no-such-host.invalid/"), K.DNS, service="strict"),
    # --- SSRF guard with an allow-list and a deny-list (main service, see SERVICES).
    Case("allowed-loopback-control", http("/ok"), OK, status=200, check=body(b"ok")),
    Case("allowed-ipv6-control", http("/ok", "::1"), OK, status=200, check=body(b"ok")),
    Case("ssrf-denied-cidr-beats-allowed-cidr", http("/ok", "127.0.0.2"), K.FORBIDDEN_TARGET, check=not_reached),
    Case("ssrf-denied-host-pattern", http("/ok", "localhost"), K.FORBIDDEN_TARGET, check=not_reached),
    Case("ssrf-denied-host-pattern-any-case", http("/ok", "LocalHost"), K.FORBIDDEN_TARGET, check=not_reached),
    Case("ssrf-unspecified-allow-list", http("/ok", "0.0.0.0"), K.FORBIDDEN_TARGET, check=not_reached),
    Case("ssrf-denied-cidr-as-mapped-ipv6", netloc("http://[::ffff:127.0.0.2]:{port}/ok?k={k}"), K.FORBIDDEN_TARGET,
         check=not_reached),
    Case("ssrf-denied-cidr-as-nat64", netloc("http://[64:ff9b::7f00:2]:{port}/ok?k={k}"), K.FORBIDDEN_TARGET,
         check=not_reached),
    Case("ssrf-redirect-to-other-loopback", redirect_to(lambda h, k: h.http(f"/record?k={k}", "127.0.0.2")),
         K.FORBIDDEN_TARGET, check=redirect_not_followed),
    Case("ssrf-redirect-to-denied-name", redirect_to(lambda h, k: h.http(f"/record?k={k}", "localhost")),
         K.FORBIDDEN_TARGET, check=redirect_not_followed),
    Case("ssrf-redirect-to-unspecified", redirect_to(lambda h, k: h.http(f"/record?k={k}", "0.0.0.0")),
         K.FORBIDDEN_TARGET, check=redirect_not_followed),
    Case("ssrf-redirect-to-mapped-ipv6",
         redirect_to(lambda h, k: f"http://[::ffff:127.0.0.2]:{h.http_port}/record?k={k}"),
         K.FORBIDDEN_TARGET, check=redirect_not_followed),
    # --- Bad request fields.
    Case("url-file-scheme", fixed("file:///etc/passwd"), K.INVALID_URL),
    Case("url-gopher-scheme", netloc("gopher://127.0.0.1:{port}/_GET"), K.INVALID_URL),
    Case("url-javascript", fixed("javascript:alert(1)"), K.INVALID_URL),
    Case("url-no-host", fixed("http:///ok"), K.INVALID_URL),
    Case("url-malformed-idna-host", fixed("http://xn--.invalid/ok"), K.INVALID_URL),
    Case("url-space-in-host", fixed("http://a b/ok"), K.INVALID_URL),
    Case("redirect-to-malformed-idna-host", redirect_to(lambda h, k: "http://xn--.invalid/ok"), K.INVALID_URL,
         check=redirect_refused),
    Case("url-bad-ipv6", fixed("http://[::1/ok"), K.INVALID_URL),
    Case("url-too-long", netloc("http://127.0.0.1:{port}/" + "a" * 70_000), K.INVALID_URL),
    Case("url-host-too-long", fixed("http://" + "a" * 60_000 + ".example/"), K.INVALID_URL,
         check=lambda result, h, k: assert_short(result.error.message)),
    Case("redirect-to-a-huge-bad-host", redirect_to(lambda h, k: "http://[" + "a" * 60_000), K.INVALID_URL,
         check=lambda result, h, k: assert_short(result.error.message)),
    Case("header-nul", http("/ok"), K.INVALID_ARGUMENT, tweak=header("X-Nul", "a\x00b")),
    Case("header-name-with-space", http("/ok"), K.INVALID_ARGUMENT, tweak=header("X Bad", "v")),
    Case("header-non-latin1-value", http("/ok"), K.INVALID_ARGUMENT, tweak=header("X-Euro", "€")),
    Case("negative-max-body-bytes", http("/ok"), K.INVALID_ARGUMENT, tweak=negative_body_limit),
    # --- Unreachable.
    Case("dns-failure", fixed("http://no-such-host.invalid/"), K.DNS),
    Case("connection-refused", lambda h, k: f"http://127.0.0.1:{h.refused_port}/", K.CONNECT),
    # --- Slow and silent targets: the total deadline ends them.
    Case("slow-drip-status-line", http("/drip-status"), K.TIMEOUT, timeout=SLOW, check=hung_up_early),
    Case("slow-drip-headers", http("/drip-headers"), K.TIMEOUT, timeout=SLOW, check=hung_up_early),
    Case("slow-drip-body", http("/drip-body"), K.TIMEOUT, timeout=SLOW, check=hung_up_early),
    Case("accepts-never-answers", http("/silent"), K.TIMEOUT, timeout=SLOW, check=hung_up_early),
    Case("endless-100-continue", http("/continue-flood"), K.TIMEOUT, timeout=SLOW, check=hung_up_early),
    Case("tcp-backlog-never-accepted", lambda h, k: f"http://127.0.0.1:{h.blackhole_port}/", K.TIMEOUT,
         timeout=SLOW),
    Case("tls-handshake-never-answered", lambda h, k: f"https://127.0.0.1:{h.blackhole_port}/", K.TIMEOUT,
         timeout=SLOW),
    Case("h2-never-answers", h2("/silent"), K.TIMEOUT, timeout=SLOW, check=hung_up_early),
    Case("h2-headers-then-silence", h2("/headers-then-silence"), K.TIMEOUT, timeout=SLOW, check=hung_up_early),
    # --- Size limits.
    Case("body-endless-chunked", http("/body-endless"), K.TOO_LARGE, max_body_bytes=MiB, check=stopped_reading),
    Case("body-endless-close-delimited", http("/body-endless-close"), K.TOO_LARGE, max_body_bytes=MiB,
         check=stopped_reading),
    Case("body-declared-1-tb", http("/body-declared-huge"), K.TOO_LARGE, max_body_bytes=MiB),
    Case("gzip-bomb", http("/gzip-bomb"), K.TOO_LARGE, max_body_bytes=MiB),
    Case("deflate-bomb", http("/deflate-bomb"), K.TOO_LARGE, max_body_bytes=MiB),
    Case("h2-body-endless", h2("/data-endless"), K.TOO_LARGE, max_body_bytes=MiB, check=stopped_reading),
    Case("headers-80-kb", http("/headers-big?n=80000"), K.TOO_LARGE),
    Case("headers-1-mb", http("/headers-big?n=1000000"), (K.TOO_LARGE, K.PROTOCOL), why=LIBRARY_HEADER_LIMIT_H1),
    Case("headers-endless", http("/headers-endless"), (K.TOO_LARGE, K.PROTOCOL), why=LIBRARY_HEADER_LIMIT_H1),
    Case("headers-300-fields", http("/headers-many?n=300"), K.TOO_LARGE),
    Case("h2-headers-300-fields", h2("/headers-many?n=300"), K.TOO_LARGE),
    Case("h2-headers-200-kb", h2("/headers-huge?n=200000"), (K.TOO_LARGE, K.PROTOCOL), why=LIBRARY_HEADER_LIMIT_H2),
    # --- Redirects.
    Case("redirect-to-itself", http("/redirect-self"), K.TOO_MANY_REDIRECTS),
    Case("redirect-ping-pong", http("/redirect-a"), K.TOO_MANY_REDIRECTS),
    Case("redirect-endless-chain", http("/redirect-inf"), K.TOO_MANY_REDIRECTS),
    Case("redirect-to-ftp", http("/redirect-to?to=ftp%3A%2F%2F127.0.0.1%2Fx"), K.INVALID_URL,
         check=redirect_refused),
    Case("redirect-to-unclosed-ipv6", http("/redirect-to?to=http%3A%2F%2F%5Bbad%2Fx"), K.INVALID_URL,
         check=redirect_refused),
    # httpx would send these to the redirecting host on port 80; typed, they are refused (no host).
    Case("redirect-to-no-host", http("/redirect-to?to=http%3A%2F%2F%2Fok"), K.INVALID_URL, check=redirect_refused),
    Case("redirect-to-no-authority", http("/redirect-to?to=http%3A%2Fok"), K.INVALID_URL, check=redirect_refused),
    Case("redirect-bad-location", http("/redirect-bad-location"), K.INVALID_URL, check=redirect_refused),
    Case("redirect-bad-location-not-followed", http("/redirect-bad-location"), OK, status=302,
         tweak=not_following),
    Case("redirect-without-location", http("/redirect-no-location"), OK, status=302),
    # --- Broken HTTP/1.1.
    Case("reset-mid-body", http("/reset-mid-body"), K.NETWORK),
    Case("closed-mid-body", http("/close-mid-body"), K.PROTOCOL),
    Case("reset-before-response", http("/reset-before-response"), K.NETWORK),
    Case("closed-before-response", http("/close-before-response"), K.PROTOCOL),
    Case("garbage-status-line", http("/garbage-status"), K.PROTOCOL),
    Case("header-line-without-colon", http("/bad-header-line"), K.PROTOCOL),
    Case("content-length-not-a-number", http("/bad-content-length"), K.PROTOCOL),
    Case("conflicting-content-lengths", http("/conflicting-content-length"), K.PROTOCOL),
    Case("bad-chunk-size", http("/bad-chunk"), K.PROTOCOL),
    Case("gzip-that-is-not-gzip", http("/gzip-garbage"), K.PROTOCOL),
    Case("gzip-control", http("/gzip-ok"), OK, status=200, check=body(GZIP_OK_BODY)),
    # --- TLS.
    Case("tls-control", tls("good"), OK, status=200, check=body(b"ok")),
    Case("tls-self-signed", tls("self_signed"), K.TLS),
    Case("tls-expired", tls("expired"), K.TLS),
    Case("tls-wrong-host", tls("wrong_host"), K.TLS),
    Case("tls-untrusted-ca", tls("untrusted"), K.TLS),
    Case("tls-to-a-plain-http-port", lambda h, k: f"https://127.0.0.1:{h.http_port}/ok", K.TLS),
    Case("tls-peer-hangs-up-in-handshake", lambda h, k: f"https://127.0.0.1:{h.tls_eof_port}/", K.CONNECT),
    Case("tls-self-signed-skip-verify", tls("self_signed"), OK, status=200, tweak=insecure, check=body(b"ok")),
    Case("tls-expired-skip-verify", tls("expired"), OK, status=200, tweak=insecure, check=body(b"ok")),
    Case("tls-wrong-host-skip-verify", tls("wrong_host"), OK, status=200, tweak=insecure, check=body(b"ok")),
    Case("tls-untrusted-skip-verify", tls("untrusted"), OK, status=200, tweak=insecure, check=body(b"ok")),
    # --- Broken HTTP/2.
    Case("h2-control", h2("/ok"), OK, status=200, check=body(b"ok")),
    Case("h2-rst-stream-at-once", h2("/rst-immediately"), K.PROTOCOL),
    Case("h2-rst-stream-mid-body", h2("/rst-mid-body"), K.PROTOCOL),
    Case("h2-goaway-protocol-error", h2("/goaway-error"), K.PROTOCOL),
    Case("h2-goaway-mid-body", h2("/goaway-mid-body"), K.PROTOCOL),
    Case("h2-goaway-graceful-is-retried", h2("/goaway-graceful"), OK, status=200, check=sent_twice),
    Case("h2-content-length-mismatch", h2("/bad-content-length"), K.PROTOCOL),
    Case("h2-response-without-status", h2("/no-status"), K.PROTOCOL),
    Case("h2-data-frame-on-stream-0", h2("/data-on-stream-0"), K.PROTOCOL),
]


def _key(case: Case, transport: str) -> str:
    """The case's key at the hostile servers (their records outlive one transport's run)."""
    return f"{transport}-{case.name}"


def _request(case: Case, hostile: HostileServers, transport: str) -> pb.FetchRequest:
    request = pb.FetchRequest(id=case.name, url=case.url(hostile, _key(case, transport)),
                              max_body_bytes=case.max_body_bytes)
    request.timeout.FromMilliseconds(int(case.timeout * 1000))
    if case.tweak is not None:
        case.tweak(request)
    return request


@dataclasses.dataclass(repr=False)
class Run:
    services: dict[str, FetchpoolService]
    callers: dict[str, Caller]
    baseline_sockets: dict[str, int]
    results: dict[str, list[pb.FetchResult]]
    batches: dict[str, list[pb.FetchResult]]


@pytest.fixture(scope="module")
def corpus(certs: Certs, hostile: HostileServers, transport: str) -> Iterator[Run]:
    chosen = ("--transport", transport)
    with running(certs, *chosen, *SERVICES["main"]) as (main, main_caller), \
            running(certs, *chosen, *SERVICES["strict"], strict=True) as (strict, strict_caller):
        services = {"main": main, "strict": strict}
        callers = {"main": main_caller, "strict": strict_caller}
        for caller in callers.values():
            assert caller.health() == SERVING  # our channel is connected before the baseline
        baseline = {name: socket_count(service.pid) for name, service in services.items()}
        batches: dict[str, list[pb.FetchResult]] = {}
        for name, caller in callers.items():
            cases = [case for case in CORPUS if case.service == name]
            batches[name] = caller.fetch_many([_request(c, hostile, transport) for c in cases], concurrency=len(cases),
                                              timeout=120)
        results: dict[str, list[pb.FetchResult]] = {}
        for batch in batches.values():
            for result in batch:
                results.setdefault(result.id, []).append(result)
        yield Run(services, callers, baseline, results, batches)


def test_the_corpus_is_big_and_names_are_unique() -> None:
    names = [case.name for case in CORPUS]
    assert len(set(names)) == len(names)
    assert sum(1 for case in CORPUS if case.kind != OK) >= 40
    for case in CORPUS:
        assert len(case.kinds) == 1 or case.why, case.name


def test_every_request_gets_exactly_one_result(corpus: Run) -> None:
    for name, batch in corpus.batches.items():
        cases = [case for case in CORPUS if case.service == name]
        assert sorted(r.index for r in batch) == list(range(len(cases)))
        assert [cases[r.index].name for r in batch] == [r.id for r in batch]


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_case(case: Case, corpus: Run, hostile: HostileServers, transport: str) -> None:
    [result] = corpus.results[case.name]
    got = f"{K.Kind.Name(result.error.kind)} ({result.error.message!r}), status {result.status_code}"
    wanted = "success" if case.kind == OK else " or ".join(K.Kind.Name(k) for k in case.kinds)
    if (result.error.kind if result.HasField("error") else OK) not in case.kinds:
        pytest.fail(f"{case.name}: wanted {wanted}, got {got}", pytrace=False)
    if case.kind != OK:
        assert result.error.message
    if case.status and result.status_code != case.status:
        pytest.fail(f"{case.name}: wanted status {case.status}, got {got}", pytrace=False)
    if case.check is not None:
        case.check(result, hostile, _key(case, transport))


def test_after_the_corpus_the_pools_are_clean_and_the_services_healthy(corpus: Run) -> None:
    for name, caller in corpus.callers.items():
        pools = caller.wait_pool_clean(timeout=10)
        assert all(p.requests_waiting == 0 for p in pools), name
        assert caller.health() == SERVING, name
        # No socket outside the pool's bookkeeping: what the process holds beyond its baseline
        # (gRPC listener and our channel) is the pool's open connections, give or take a
        # transient one (a resolver's, a connection being closed).
        service = corpus.services[name]
        deadline = time.monotonic() + 10
        while True:
            open_connections = sum(p.connections_open for p in caller.stats())
            extra = socket_count(service.pid) - corpus.baseline_sockets[name]
            if extra <= open_connections + 2:
                break
            assert time.monotonic() < deadline, f"{name}: {extra} sockets beyond baseline, pool has {open_connections}"
            time.sleep(0.2)
        # And it still fetches.
        if name == "main":
            assert corpus.callers[name].fetch(pb.FetchRequest(url=_ok_url(corpus)), timeout=10).status_code == 200


def _ok_url(corpus: Run) -> str:
    control = next(r for r in corpus.results["allowed-loopback-control"])
    return control.url
