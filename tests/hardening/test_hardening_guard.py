"""The SSRF guard and TLS trust beyond single corpus cases: pooled connections must not carry a
per-request exception over to other requests, pinning the checked address must keep hostname
verification, and a forward proxy is no way around the guard."""

from __future__ import annotations

import pytest
from fetchpool.v1 import fetch_pb2 as pb
from harness import Caller
from hostile import HostileServers
from support import Tinyproxy

K = pb.FetchError


def _request(url: str, *, insecure: bool = False, id: str = "") -> pb.FetchRequest:
    request = pb.FetchRequest(id=id or url, url=url, tls_insecure_skip_verify=insecure)
    request.timeout.FromSeconds(10)
    return request


def _kind(result: pb.FetchResult) -> str:
    return K.Kind.Name(result.error.kind) if result.HasField("error") else f"HTTP {result.status_code}"


@pytest.mark.parametrize("cert", ["self_signed", "expired", "wrong_host", "untrusted"])
def test_skipping_verification_is_for_that_request_only(
    start_service: ..., hostile: HostileServers, cert: str
) -> None:
    service = start_service()
    url = hostile.tls(cert, f"/ok?k=per-request-{cert}")
    sequence = [False, True, False, True, True, False]  # verified first, then alternating
    with Caller(service.target) as caller:
        kinds = [_kind(caller.fetch(_request(url, insecure=insecure))) for insecure in sequence]
        # Concurrently too: an insecure connection open in the pool must not serve a verified request.
        batch = caller.fetch_many([_request(url, insecure=i % 2 == 0, id=str(i)) for i in range(8)], concurrency=8)
    assert kinds == ["TLS" if not insecure else "HTTP 200" for insecure in sequence]
    for result in batch:
        assert _kind(result) == ("HTTP 200" if int(result.id) % 2 == 0 else "TLS"), result.id


def test_skipping_verification_over_http2_does_not_leak_into_multiplexed_streams(
    start_service: ..., hostile: HostileServers
) -> None:
    service = start_service()
    url = f"https://127.0.0.1:{hostile.h2_self_signed_port}/ok"
    with Caller(service.target) as caller:
        first = caller.fetch(_request(url, insecure=True))
        batch = caller.fetch_many([_request(url, insecure=i % 2 == 0, id=str(i)) for i in range(20)], concurrency=20)
    assert (first.status_code, first.http_version) == (200, "HTTP/2")
    for result in batch:
        assert _kind(result) == ("HTTP 200" if int(result.id) % 2 == 0 else "TLS"), result.id


def test_the_guard_pins_the_address_but_verifies_the_host_name(start_service: ..., hostile: HostileServers) -> None:
    # The certificate names only "localhost": connecting to the checked address must still
    # verify (and send SNI for) the name in the URL.
    service = start_service()
    with Caller(service.target) as caller:
        by_name = caller.fetch(_request(hostile.tls("localhost_only", "/ok", host="localhost")))
        by_address = caller.fetch(_request(hostile.tls("localhost_only", "/ok")))
    assert _kind(by_name) == "HTTP 200" and by_name.body == b"ok"
    assert _kind(by_address) == "TLS"


def test_a_forward_proxy_is_no_way_around_the_guard(start_service: ..., hostile: HostileServers) -> None:
    with Tinyproxy(allow_connect_ports=[hostile.tls_ports["good"]]) as tinyproxy:
        _through_proxy_the_guard_still_refuses(start_service("--proxy", tinyproxy.url, strict=True), hostile)


def _through_proxy_the_guard_still_refuses(service: ..., hostile: HostileServers) -> None:
    requests = [
        _request(hostile.http("/record?k=via-proxy-plain"), id="plain"),
        _request(hostile.http("/record?k=via-proxy-decimal").replace("127.0.0.1", "2130706433"), id="decimal"),
        _request(hostile.tls("good", "/record?k=via-proxy-tls"), id="tls"),
        _request(hostile.http(f"/redirect-to?to=http%3A%2F%2F127.0.0.1%3A{hostile.http_port}%2Frecord"), id="redirect"),
    ]
    with Caller(service.target) as caller:
        results = caller.fetch_many(requests)
    assert {r.id: _kind(r) for r in results} == dict.fromkeys(["plain", "decimal", "tls", "redirect"],
                                                              "FORBIDDEN_TARGET")
    for key in ("via-proxy-plain", "via-proxy-decimal", "via-proxy-tls"):
        assert hostile.recorder.snapshot(key).requests == 0, key
