"""Limits against hostile targets beyond the corpus' error kinds: what fetchpool asks for, how much
memory a compression bomb may cost, and the caps on concurrent fetches (per call, per process)."""

from __future__ import annotations

import concurrent.futures
from urllib.parse import quote

import pytest
from fetchpool.v1 import fetch_pb2 as pb
from harness import Caller, proc_status
from hostile import BOMB_BYTES, HostileServers

K = pb.FetchError
MiB = 1024 * 1024


def _request(url: str, *, id: str = "", max_body_bytes: int = 0, timeout: float = 30) -> pb.FetchRequest:
    request = pb.FetchRequest(id=id or url, url=url, max_body_bytes=max_body_bytes)
    request.timeout.FromMilliseconds(int(timeout * 1000))
    return request


def test_only_gzip_and_deflate_are_asked_for(start_service: ..., hostile: HostileServers) -> None:
    # The encodings fetchpool decodes itself, within the body limit (a caller that sets its own
    # Accept-Encoding gets other encodings as sent, raw bytes under the same limit).
    service = start_service()
    with Caller(service.target) as caller:
        result = caller.fetch(_request(hostile.http("/record?k=accept-encoding")))
    assert result.status_code == 200
    sent = [v for n, v in hostile.recorder.snapshot("accept-encoding").headers if n.lower() == "accept-encoding"]
    assert sent == ["gzip, deflate"]


@pytest.mark.parametrize("path", ["/gzip-bomb", "/deflate-bomb"])
def test_a_compression_bomb_is_never_inflated_in_memory(
    start_service: ..., hostile: HostileServers, path: str
) -> None:
    # BOMB_BYTES (256 MiB) of zeros, about 256 KiB compressed: inflating even one 64 KiB read
    # of it at once would take ~64 MiB. The process' peak RSS may grow by the limit and change.
    service = start_service()
    with Caller(service.target) as caller:
        for _ in range(2):  # warm up: the same code paths with a legitimate 1 MiB body
            assert caller.fetch(_request(hostile.http("/gzip-ok"))).status_code == 200
            assert len(caller.fetch(_request(hostile.http(f"/zeros?n={MiB}"))).body) == MiB
        before = proc_status(service.pid)["VmHWM"]
        result = caller.fetch(_request(hostile.http(path), max_body_bytes=MiB))
        after = proc_status(service.pid)["VmHWM"]
    assert result.error.kind == K.TOO_LARGE, result.error
    assert (after - before) * 1024 < 32 * MiB < BOMB_BYTES, f"peak RSS grew by {(after - before) // 1024} MiB"


def test_the_process_wide_cap_holds_across_calls(start_service: ..., hostile: HostileServers) -> None:
    service = start_service("--max-fetches", "4")

    def url(i: int) -> str:
        return hostile.http(f"/hold?s=0.3&g=max-fetches&k=max-fetches-{i}")

    with Caller(service.target) as caller, concurrent.futures.ThreadPoolExecutor(max_workers=9) as pool:
        batches = [
            pool.submit(caller.fetch_many, [_request(url(b * 8 + i)) for i in range(8)], 8) for b in range(3)
        ]
        singles = [pool.submit(caller.fetch, _request(url(100 + i))) for i in range(6)]
        results = [r for future in batches for r in future.result(60)] + [f.result(60) for f in singles]
        pools = caller.wait_pool_clean()
    assert len(results) == 30
    assert all(r.status_code == 200 and not r.HasField("error") for r in results), [
        K.Kind.Name(r.error.kind) for r in results if r.HasField("error")
    ]
    assert hostile.recorder.peak("max-fetches") == 4
    assert pools[0].requests_waiting == 0


def test_a_call_never_has_more_in_flight_than_its_concurrency(start_service: ..., hostile: HostileServers) -> None:
    service = start_service()
    requests = [_request(hostile.http(f"/hold?s=0.2&g=per-call&k=per-call-{i}"), id=str(i)) for i in range(12)]
    with Caller(service.target) as caller:
        results = caller.fetch_many(requests, concurrency=3)
    assert sorted(int(r.id) for r in results) == list(range(12))
    assert all(r.status_code == 200 for r in results)
    assert hostile.recorder.peak("per-call") == 3


def _hops(hostile: HostileServers, count: int) -> str:
    """A chain of ``count`` redirects ending at /ok."""
    target = "/ok"
    for _ in range(count):
        target = "/redirect-to?to=" + quote(target, safe="")
    return hostile.http(target)


def test_the_limits_are_the_configured_ones(start_service: ..., hostile: HostileServers) -> None:
    service = start_service("--max-header-count", "20", "--max-header-bytes", "4096", "--max-redirects", "2",
                            "--max-body-bytes", "1000")
    cases = {  # id -> (url, max_body_bytes, expected: status or kind name)
        "fields-under": (hostile.http("/headers-many?n=10"), 0, 200),
        "fields-over": (hostile.http("/headers-many?n=30"), 0, "TOO_LARGE"),
        "bytes-under": (hostile.http("/headers-big?n=2000"), 0, 200),
        "bytes-over": (hostile.http("/headers-big?n=5000"), 0, "TOO_LARGE"),
        "two-hops": (_hops(hostile, 2), 0, 200),
        "three-hops": (_hops(hostile, 3), 0, "TOO_MANY_REDIRECTS"),
        "body-at-limit": (hostile.http("/zeros?n=1000"), 0, 200),
        "body-over-limit": (hostile.http("/zeros?n=1001"), 0, "TOO_LARGE"),
        "request-cannot-raise-limit": (hostile.http("/zeros?n=2000"), 10**9, "TOO_LARGE"),
        "request-may-lower-limit": (hostile.http("/zeros?n=500"), 100, "TOO_LARGE"),
    }
    requests = [_request(url, id=id, max_body_bytes=cap) for id, (url, cap, _) in cases.items()]
    loop = _request(hostile.http("/redirect-self"), id="loop-not-followed")
    loop.follow_redirects = False
    with Caller(service.target) as caller:
        results = {r.id: r for r in caller.fetch_many([*requests, loop])}
    got = {id: K.Kind.Name(r.error.kind) if r.HasField("error") else r.status_code for id, r in results.items()}
    assert got == {id: expected for id, (_, _, expected) in cases.items()} | {"loop-not-followed": 302}
