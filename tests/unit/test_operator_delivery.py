"""Delivery of limits over gRPC (``fetchpool.operator.delivery``) to in-process fake pods.

The "pods" are real ``grpc.aio`` servers on loopback running a small fake ``PoolAdmin`` (partial
updates, INVALID_ARGUMENT for inconsistent limits, like the service's contract in fetch.proto), plus
a socket that accepts connections and never answers, and a closed port.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from fetchpool.operator.delivery import ChannelSecurity, Delivery, PodPlan, PodTarget, PoolExtras
from fetchpool.operator.policy import DEFAULT_POOL, Limits
from fetchpool.v1 import fetch_pb2, fetch_pb2_grpc


@dataclass
class FakePoolAdmin(fetch_pb2_grpc.PoolAdminServicer):
    pools: dict[str, fetch_pb2.PoolLimits] = field(default_factory=dict)
    sets: list[tuple[str, fetch_pb2.PoolLimits]] = field(default_factory=list)
    history: dict[str, list[int]] = field(default_factory=dict)
    demand: dict[str, tuple[int, int]] = field(default_factory=dict)
    token: str | None = None

    async def _check(self, context) -> None:  # type: ignore[no-untyped-def]
        if self.token is not None and ("authorization", f"Bearer {self.token}") not in context.invocation_metadata():
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")

    def _response(self) -> fetch_pb2.GetPoolLimitsResponse:
        return fetch_pb2.GetPoolLimitsResponse(pools=self.pools)

    async def GetPoolLimits(self, request, context):  # type: ignore[no-untyped-def]
        await self._check(context)
        return self._response()

    async def SetPoolLimits(self, request, context):  # type: ignore[no-untyped-def]
        await self._check(context)
        self.sets.append((request.pool, request.limits))
        names = [request.pool] if request.pool else list(self.pools)
        updated = {}
        for name in names:
            merged = fetch_pb2.PoolLimits()
            merged.CopyFrom(self.pools[name])
            merged.MergeFrom(request.limits)
            if merged.max_keepalive_connections > merged.max_connections or (
                merged.max_connections_per_host > merged.max_connections
            ):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "inconsistent limits")
            updated[name] = merged
        for name, merged in updated.items():
            self.pools[name] = merged
            self.history.setdefault(name, []).append(merged.max_connections)
        return self._response()

    async def GetPoolStats(self, request, context):  # type: ignore[no-untyped-def]
        return fetch_pb2.GetPoolStatsResponse(
            pools=[
                fetch_pb2.PoolStats(
                    pool=name,
                    limits=limits,
                    requests_active=self.demand.get(name, (0, 0))[0],
                    requests_waiting=self.demand.get(name, (0, 0))[1],
                )
                for name, limits in self.pools.items()
            ]
        )


def pool(n: int, keep: int | None = None, per_host: int | None = None) -> fetch_pb2.PoolLimits:
    msg = fetch_pb2.PoolLimits(max_connections=n, max_keepalive_connections=n if keep is None else keep)
    if per_host is not None:
        msg.max_connections_per_host = per_host
    return msg


@pytest.fixture
async def pods() -> AsyncIterator[list[tuple[PodTarget, FakePoolAdmin]]]:
    servers, out = [], []
    for i in range(3):
        admin = FakePoolAdmin(pools={"direct": pool(30, 15), "http://proxy:3128": pool(30, 15)})
        server = grpc.aio.server()
        fetch_pb2_grpc.add_PoolAdminServicer_to_server(admin, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        out.append((PodTarget(name=f"pod-{i}", address=f"127.0.0.1:{port}"), admin))
    yield out
    await asyncio.gather(*(s.stop(None) for s in servers))


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A port that accepts TCP connections and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def closed_port() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"127.0.0.1:{port}"


LIMITS = {DEFAULT_POOL: Limits(max_connections=10, max_keepalive_connections=5)}


def plans(targets: list[PodTarget], limits: dict[str, Limits] = LIMITS, *, lower_only: bool = False) -> list[PodPlan]:
    return [PodPlan(target=t, limits=limits, lower_only=lower_only) for t in targets]


async def test_a_silent_pod_does_not_block_the_others(
    pods: list[tuple[PodTarget, FakePoolAdmin]], blackhole: str, closed_port: str
) -> None:
    delivery = Delivery(timeout=1.0)
    targets = [
        PodTarget(name="silent", address=blackhole),
        PodTarget(name="silent-too", address=blackhole),
        *(t for t, _ in pods),
        PodTarget(name="gone", address=closed_port),
    ]
    started = time.monotonic()
    outcomes = {o.name: o for o in await delivery.push(plans(targets))}
    elapsed = time.monotonic() - started
    assert elapsed < 1.8, elapsed  # concurrent: one timeout (1 s), not one per silent pod (2 s)
    for target, admin in pods:
        assert outcomes[target.name].ok and outcomes[target.name].changed
        assert {n: p.max_connections for n, p in admin.pools.items()} == {"direct": 10, "http://proxy:3128": 10}
        assert admin.sets == [("", fetch_pb2.PoolLimits(max_connections=10, max_keepalive_connections=5))]
    for silent in ("silent", "silent-too"):
        error = outcomes[silent].error
        assert not outcomes[silent].ok and error is not None and error.startswith("DEADLINE_EXCEEDED"), error
    assert not outcomes["gone"].ok and outcomes["gone"].error is not None
    assert outcomes["gone"].error.startswith("UNAVAILABLE")


async def test_pushing_again_changes_nothing(pods: list[tuple[PodTarget, FakePoolAdmin]]) -> None:
    delivery = Delivery(timeout=2.0)
    targets = [t for t, _ in pods]
    await delivery.push(plans(targets))
    second = await delivery.push(plans(targets))
    assert all(o.ok and not o.changed for o in second)
    assert all(len(admin.sets) == 1 for _, admin in pods)


async def test_proxy_budgets_are_set_pool_by_pool(pods: list[tuple[PodTarget, FakePoolAdmin]]) -> None:
    target, admin = pods[0]
    limits = {**LIMITS, "http://proxy:3128": Limits(max_connections=4, max_keepalive_connections=2)}
    [outcome] = await Delivery(timeout=2.0).push(plans([target], limits), PoolExtras(keepalive_expiry_seconds=7.5))
    assert outcome.ok and outcome.in_force == {"direct": 10, "http://proxy:3128": 4}
    assert sorted(name for name, _ in admin.sets) == ["direct", "http://proxy:3128"]
    assert admin.history["http://proxy:3128"] == [4]  # never passed through the direct pool's 10
    assert admin.pools["direct"].keepalive_expiry.ToMilliseconds() == 7500


async def test_per_host_cap_follows_a_shrink(pods: list[tuple[PodTarget, FakePoolAdmin]]) -> None:
    target, admin = pods[0]
    admin.pools = {"direct": pool(30, 15, per_host=20)}
    [outcome] = await Delivery(timeout=2.0).push(plans([target]))
    assert outcome.ok, outcome.error
    assert admin.pools["direct"].max_connections_per_host == 10


async def test_a_refusal_is_reported(pods: list[tuple[PodTarget, FakePoolAdmin]]) -> None:
    target, admin = pods[0]
    bad = {DEFAULT_POOL: Limits(max_connections=10, max_keepalive_connections=11)}
    [outcome] = await Delivery(timeout=2.0).push(plans([target], bad))
    assert not outcome.ok and outcome.error == "INVALID_ARGUMENT: inconsistent limits"
    assert admin.pools["direct"].max_connections == 30  # old limits stay in force


async def test_lower_only_never_raises(pods: list[tuple[PodTarget, FakePoolAdmin]]) -> None:
    target, admin = pods[0]
    admin.pools = {"direct": pool(30, 15), "http://proxy:3128": pool(6, 6)}
    [outcome] = await Delivery(timeout=2.0).push(plans([target], lower_only=True))
    assert outcome.ok and outcome.in_force == {"direct": 10, "http://proxy:3128": 6}  # 6 stays: lower only
    assert admin.pools["http://proxy:3128"].max_keepalive_connections == 5  # ... but its keep-alive follows
    [again] = await Delivery(timeout=2.0).push(plans([target], lower_only=True))
    assert again.ok and not again.changed


async def test_demand_is_in_flight_plus_queued(pods: list[tuple[PodTarget, FakePoolAdmin]], blackhole: str) -> None:
    (t0, a0), (t1, a1), _ = pods
    a0.demand = {"direct": (3, 2)}
    a1.demand = {"direct": (1, 0), "http://proxy:3128": (4, 4)}
    got = await Delivery(timeout=0.5).demand([t0, t1, PodTarget(name="silent", address=blackhole)])
    assert got == {
        "pod-0": {"direct": 5.0, "http://proxy:3128": 0.0},
        "pod-1": {"direct": 1.0, "http://proxy:3128": 8.0},
    }


async def test_tls_with_client_certificate_and_token(tmp_path: Path) -> None:
    """Pods dialled by IP, certificates naming the service: the operator verifies the name given."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("fetchpool.pods.internal")
    client_cert = ca.issue_cert("fetchpool-operator")
    admin = FakePoolAdmin(pools={"direct": pool(30, 15)}, token="s3cret")
    server = grpc.aio.server()
    fetch_pb2_grpc.add_PoolAdminServicer_to_server(admin, server)
    credentials = grpc.ssl_server_credentials(
        [(server_cert.private_key_pem.bytes(), server_cert.cert_chain_pems[0].bytes())],
        root_certificates=ca.cert_pem.bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        files = {}
        for name, blob in (
            ("ca", ca.cert_pem.bytes()),
            ("cert", client_cert.cert_chain_pems[0].bytes()),
            ("key", client_cert.private_key_pem.bytes()),
            ("token", b"s3cret\n"),
        ):
            files[name] = tmp_path / name
            files[name].write_bytes(blob)
        security = ChannelSecurity.from_env(
            {
                "FETCHPOOL_OPERATOR_TLS_CA": str(files["ca"]),
                "FETCHPOOL_OPERATOR_TLS_CERT": str(files["cert"]),
                "FETCHPOOL_OPERATOR_TLS_KEY": str(files["key"]),
                "FETCHPOOL_ADMIN_TOKEN_FILE": str(files["token"]),
                "FETCHPOOL_OPERATOR_TLS_SERVER_NAME": "fetchpool.pods.internal",
            }
        )
        assert security.problems() == []
        target = PodTarget(name="tls", address=f"127.0.0.1:{port}")
        [outcome] = await Delivery(timeout=3.0, security=security).push(plans([target]))
        assert outcome.ok, outcome.error
        assert admin.pools["direct"].max_connections == 10

        files["token"].write_text("s3cret\nolder-token\n")  # during a rotation: the first line is sent
        [outcome] = await Delivery(timeout=3.0, security=security).push(plans([target]))
        assert outcome.ok, outcome.error
        files["token"].write_text("rotated")  # the token file is re-read every round
        [outcome] = await Delivery(timeout=3.0, security=security).push(plans([target]))
        assert not outcome.ok and outcome.error == "UNAUTHENTICATED: bad token"
        files["token"].write_text("")
        [outcome] = await Delivery(timeout=3.0, security=security).push(plans([target]))
        assert not outcome.ok and outcome.error is not None and "no token" in outcome.error
    finally:
        await server.stop(None)


def test_security_problems() -> None:
    assert ChannelSecurity(cert_file="/x").problems() == [
        "a TLS client certificate needs both the certificate and the key file",
        "TLS to the pods needs the CA file (FETCHPOOL_OPERATOR_TLS_CA / --tls-ca)",
        "/x: no such file",
    ]
