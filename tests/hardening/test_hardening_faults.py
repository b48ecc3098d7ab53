"""Faults of the infrastructure rather than of one target: the only proxy killed mid-batch, and
the service's own pod stopped (SIGTERM) in the middle of a large FetchMany."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
from fetchpool.v1 import fetch_pb2 as pb
from harness import NOT_SERVING, SERVING, Caller
from hostile import HostileServers
from support import Tinyproxy

K = pb.FetchError


def _request(url: str, *, id: str, timeout: float = 20) -> pb.FetchRequest:
    request = pb.FetchRequest(id=id, url=url)
    request.timeout.FromSeconds(int(timeout))
    return request


def _until(check: ..., timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_the_only_proxy_killed_mid_batch(start_service: ..., hostile: HostileServers) -> None:
    with Tinyproxy(allow_connect_ports=[hostile.tls_ports["good"]]) as proxy:
        service = start_service("--proxy", proxy.url)
        requests = [_request(hostile.http(f"/hold?s=10&g=proxy-kill&k=pk-http-{i}"), id=f"http-{i}") for i in range(20)]
        requests += [
            _request(hostile.tls("good", f"/hold?s=10&g=proxy-kill&k=pk-tls-{i}"), id=f"tls-{i}") for i in range(20)
        ]
        with Caller(service.target) as caller, concurrent.futures.ThreadPoolExecutor(1) as pool:
            batch = pool.submit(caller.fetch_many, requests, 40, 60)
            _until(lambda: hostile.recorder.active("proxy-kill") >= 20, 15, "20 fetches in flight")
            proxy.kill()
            results = batch.result(45)
            pools = caller.wait_pool_clean()
            healthy = caller.health()
    assert sorted(r.index for r in results) == list(range(40))
    kinds = {r.id: K.Kind.Name(r.error.kind) if r.HasField("error") else r.status_code for r in results}
    failed = {id: kind for id, kind in kinds.items() if kind != 200}
    assert len(failed) >= 20, kinds
    assert set(failed.values()) <= {"PROXY", "NETWORK"}, failed
    assert all(r.error.message for r in results if r.HasField("error"))
    assert pools[0].pool == proxy.url and healthy == SERVING


# CONNECT misbehaviours of a proxy of ours (hostile.PROXY_FAULTS) -> the kinds accepted, and why
# when more than one: after "200 Connection established" the bytes come from the target through
# the tunnel, so a hang-up during the TLS handshake may be the target's (CONNECT) or the proxy's
# (PROXY); a reply to CONNECT that is not HTTP is the proxy's failure (PROXY) and a broken protocol
# (PROTOCOL) at once.
PROXY_CASES: dict[str, set[str]] = {
    "close-after-200": {"PROXY", "CONNECT"},
    "reset-after-200": {"PROXY", "CONNECT"},
    "reset-before-reply": {"PROXY"},
    "bad-gateway": {"PROXY"},
    "auth-required": {"PROXY_AUTH"},
    "silent": {"TIMEOUT"},
    "garbage-reply": {"PROXY", "PROTOCOL"},
}


def test_a_proxy_failing_connect_in_every_way_leaves_the_pool_clean(
    start_service: ..., hostile: HostileServers
) -> None:
    service = start_service("--proxy", hostile.proxy_url)
    requests = [_request(hostile.through_proxy(fault), id=fault, timeout=3) for fault in PROXY_CASES]
    requests += [_request(hostile.tls("good"), id="control-h1"), _request(hostile.h2("/ok"), id="control-h2")]
    with Caller(service.target) as caller:
        results = {r.id: r for r in caller.fetch_many(requests, len(requests), 60)}
        kinds = {id: K.Kind.Name(r.error.kind) if r.HasField("error") else r.status_code for id, r in results.items()}
        assert {id: kind for id, kind in kinds.items() if kind not in PROXY_CASES.get(id, {200})} == {}
        assert all(r.error.message for r in results.values() if r.HasField("error"))
        # A tunnel whose TLS handshake failed must not stay in the pool as a connection in use.
        caller.wait_pool_clean(timeout=5)
        assert caller.health() == SERVING


def test_sigterm_during_a_large_batch_loses_nothing(start_service: ..., hostile: HostileServers,
                                                    transport: str) -> None:
    service = start_service("--grace-period", "10")
    total = 2000
    key = f"drain-{transport}"  # the hostile servers' records outlive one transport's run
    requests = [_request(hostile.http(f"/hold?s=0.2&g=drain&k={key}-{i}"), id=str(i)) for i in range(total)]
    results: list[pb.FetchResult] = []
    errors: list[BaseException] = []
    caller = Caller(service.target)

    def consume() -> None:
        call = caller.fetch_stub.FetchMany(pb.FetchManyRequest(requests=requests, concurrency=50), timeout=120)
        try:
            for result in call:  # ends when the server ends the stream
                results.append(result)
        except BaseException as exc:
            errors.append(exc)

    consumer = threading.Thread(target=consume)
    try:
        consumer.start()
        _until(lambda: len(results) >= 300, 60, "300 results before the SIGTERM")
        service.terminate()
        refused = _new_calls_are_refused(caller, hostile)
        consumer.join(20)
        assert not consumer.is_alive(), "the batch did not end within the grace period"
        exit_code = service.wait(15)  # the grace period (10 s) and a margin
    finally:
        caller.close()
    assert not errors, errors
    assert refused
    assert exit_code == 0
    ids = [int(r.id) for r in results]
    assert sorted(ids) == list(range(total)), "an item was lost or answered twice"
    assert all(r.index == int(r.id) for r in results)
    finished = [r for r in results if r.status_code == 200 and not r.HasField("error")]
    unavailable = [r for r in results if r.error.kind == K.UNAVAILABLE]
    assert len(finished) + len(unavailable) == total, {K.Kind.Name(r.error.kind) for r in results}
    assert len(finished) >= 300 and unavailable
    assert all(r.error.message for r in unavailable)
    # What came back UNAVAILABLE was really never sent (resubmitting it duplicates nothing),
    # and what finished was sent once.
    assert [r.id for r in unavailable if hostile.recorder.snapshot(f"{key}-{r.id}").requests] == []
    assert [r.id for r in finished if hostile.recorder.snapshot(f"{key}-{r.id}").requests != 1] == []


def test_a_second_signal_ends_the_grace_period_at_once(start_service: ..., hostile: HostileServers,
                                                       transport: str) -> None:
    """Ctrl-C twice: the first starts the drain (60 s of grace), the second stops the fetches
    still in flight now; each comes back UNAVAILABLE, none is lost, and the service exits."""
    service = start_service("--grace-period", "60")
    group = f"hurry-{transport}"
    requests = [_request(hostile.http(f"/hold?s=40&g={group}&k={group}-{i}"), id=str(i), timeout=50)
                for i in range(8)]
    results: list[pb.FetchResult] = []
    caller = Caller(service.target)

    def consume() -> None:
        results.extend(caller.fetch_stub.FetchMany(pb.FetchManyRequest(requests=requests, concurrency=8), timeout=90))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            call = pool.submit(consume)
            _until(lambda: hostile.recorder.active(group) == len(requests), 20, "every fetch at the target")
            service.interrupt()
            _until(lambda: caller.health() != SERVING, 10, "the drain to start")
            time.sleep(0.5)
            assert not call.done(), "the first signal alone ended the call"
            hurried = time.monotonic()
            service.interrupt()
            call.result(timeout=15)
            exit_code = service.wait(15)
            took = time.monotonic() - hurried
        finally:
            caller.close()
    assert exit_code == 0 and took < 15, took
    assert sorted(int(r.id) for r in results) == list(range(len(requests)))
    assert {K.Kind.Name(r.error.kind) for r in results} == {"UNAVAILABLE"}, results[0]
    assert "second signal" in service.output()


def _new_calls_are_refused(caller: Caller, hostile: HostileServers) -> bool:
    """After SIGTERM: health leaves SERVING and a new call is refused UNAVAILABLE (bounded)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            status = caller.health()
        except grpc.RpcError:
            status = NOT_SERVING  # the server is already gone
        if status != SERVING:
            break
        assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
        time.sleep(0.02)
    try:
        caller.fetch(_request(hostile.http("/record?k=after-sigterm"), id="late"), timeout=10)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAVAILABLE and not hostile.recorder.snapshot("after-sigterm").requests
    return False


def test_requests_stopped_at_their_deadline_never_hang_the_ones_starting_beside_them(
    start_service: ..., hostile: HostileServers
) -> None:
    """A third of a batch waits on a silent target until its 0.3 s deadline stops it, while the
    rest keeps starting requests that are answered at once: every request gets its one result,
    and none of the quick ones waits for its own deadline (10 s). On curl, pycurl's AsyncCurlMulti
    dropped a new transfer whose easy handle an abort had just freed (about 1 in 300 requests),
    and that request hung until its deadline."""
    service = start_service()
    requests = []
    for i in range(3000):
        slow = i % 3 == 0
        request = pb.FetchRequest(id=str(i), url=hostile.http(f"{'/silent' if slow else '/ok'}?k=abort-churn-{i}"))
        request.timeout.FromMilliseconds(300 if slow else 10_000)
        requests.append(request)
    with Caller(service.target) as caller:
        started = time.monotonic()
        results = caller.fetch_many(requests, 96, 120)
        elapsed = time.monotonic() - started
        assert sorted(int(r.id) for r in results) == list(range(len(requests)))
        outcomes = {int(r.id): (r.error.kind if r.HasField("error") else r.status_code) for r in results}
        slow = {i: got for i, got in outcomes.items() if i % 3 == 0}
        quick = {i: got for i, got in outcomes.items() if i % 3}
        assert set(slow.values()) == {K.TIMEOUT}, slow
        wrong = {i: got for i, got in quick.items() if got != 200}
        assert not wrong, (f"{len(wrong)} quick requests did not get their 200 ({elapsed:.1f} s), "
                           f"(id, status or error kind): {list(wrong.items())[:5]}")
        caller.wait_pool_clean()
