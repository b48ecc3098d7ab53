"""The kopf handlers (``fetchpool.operator.handlers``): which events trigger which reconciliation.

kopf runs for real in the test's event loop against ``kmock``, a stateful Kubernetes API emulator
over real HTTP on loopback (there is no real API server on these machines), and watches it; the
reconciler is replaced by a recorder so that only the routing is under test. kmock's limits: no
resourceVersion, merge-only patches, lists ignore selectors, and its namespace listing is broken,
so kopf runs cluster-wide here.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import kmock as kmock_lib
import kopf
import pytest
from fetchpool.operator.handlers import HandlerSettings, register
from fetchpool.operator.health import Health

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

NS = "default"
FP = "fetchpool.io/v1alpha1/fetchpools"


@dataclass
class Recorder:
    """Stands in for the Reconciler: records every trigger; ``gate`` answers ``may_act``."""

    health: Health = field(default_factory=Health)
    triggers: list[tuple[str, str, str, bool]] = field(default_factory=list)
    forgotten: list[tuple[str, str]] = field(default_factory=list)
    gate: Any = None

    async def may_act(self, namespace: str) -> bool:
        return True if self.gate is None else bool(await self.gate(namespace))

    async def trigger(self, namespace: str, name: str, *, reason: str = "", full: bool = False) -> None:
        self.triggers.append((namespace, name, reason, full))

    def forget(self, namespace: str, name: str) -> None:
        self.forgotten.append((namespace, name))

    async def close(self) -> None:
        pass


async def _create(kmock: Any, api_version: str, plural: str, kind: str, name: str,
                  labels: dict[str, str] | None = None, **body: Any) -> None:
    """Create a namespaced object (in NS) through kmock's API; ``body`` gives its spec, status."""
    metadata: dict[str, Any] = {"name": name, "namespace": NS, **({"labels": labels} if labels else {})}
    prefix = "/apis" if "/" in api_version else "/api"  # the core group has no name
    await kmock.post(f"{prefix}/{api_version}/namespaces/{NS}/{plural}",
                     json={"apiVersion": api_version, "kind": kind, "metadata": metadata, **body})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met in time; {predicate}")
        await asyncio.sleep(0.02)


@dataclass
class Running:
    kmock: Any
    recorder: Recorder
    liveness: str
    metrics: str

    def reasons(self) -> list[str]:
        return [reason for _, _, reason, _ in self.recorder.triggers]


@pytest.fixture
async def operator(kmock: Any) -> AsyncIterator[Running]:
    kmock.resources.load_bundled()
    kmock.resources[FP] = kmock.ResourceInfo(
        kind="FetchPool", namespaced=True, subresources={"status"}, verbs={"get", "list", "watch", "patch", "create"}
    )
    url = str(kmock.url).rstrip("/")
    await _create(kmock, "fetchpool.io/v1alpha1", "fetchpools", "FetchPool", "pool",
                  spec={"target": {"name": "web"}, "connectionBudget": 60})
    await _create(kmock, "apps/v1", "deployments", "Deployment", "web",
                  spec={"replicas": 2, "selector": {"matchLabels": {"app": "web"}}})
    await _create(kmock, "autoscaling/v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", "web",
                  spec={"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "maxReplicas": 8},
                  status={"currentReplicas": 2, "desiredReplicas": 2})

    # The first HPA watch answers "410 Gone" (resource version too old), as a real API server does
    # after a quiet spell; kopf must re-list and watch again (test_410_gone_relists).
    hpas = kmock_lib.resource("autoscaling", "v2", "horizontalpodautoscalers")
    gone: list[int] = []

    def first_watch_is_gone(_: Any) -> Any:
        if gone:
            return NotImplemented  # later watches fall through to the emulator
        gone.append(1)
        return (
            {
                "type": "ERROR",
                "object": {
                    "apiVersion": "v1",
                    "kind": "Status",
                    "status": "Failure",
                    "code": 410,
                    "reason": "Expired",
                    "message": "too old resource version",
                },
            },
        )

    kmock["watch", hpas] << first_watch_is_gone

    recorder = Recorder()
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:  # test only: point kopf at the emulator
        return kopf.ConnectionInfo(server=url, scheme="Bearer", token="test")

    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    metrics = f"http://127.0.0.1:{free_port()}/metrics"
    register(
        registry,
        recorder,
        HandlerSettings(
            resync_seconds=3600,
            login=False,  # type: ignore[arg-type]
            metrics_endpoint=metrics,
        ),
    )
    # kopf runs in its own thread and event loop (as kopf.testing.KopfRunner does): on exit it
    # cancels every task created after its start, which in the test's loop would include pytest's.
    stop = threading.Event()
    thread = threading.Thread(
        target=lambda: asyncio.run(
            kopf.operator(
                registry=registry, standalone=True, clusterwide=True, liveness_endpoint=liveness, stop_flag=stop
            )
        ),
        daemon=True,
    )
    thread.start()
    running = Running(kmock=kmock, recorder=recorder, liveness=liveness, metrics=metrics)
    try:
        # The FetchPool's creation and the initial listing of the HPA both trigger a round.
        await wait_for(lambda: "hpa web" in running.reasons() and any("fetchpool" in r for r in running.reasons()))
        yield running
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 10)  # keep serving the emulator while kopf stops
        assert not thread.is_alive()


async def test_a_status_only_hpa_change_triggers_a_round(operator: Running) -> None:
    operator.recorder.triggers.clear()
    response = await operator.kmock.patch(
        f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/web/status",
        json={"status": {"desiredReplicas": 6}},
    )
    assert response.status == 200
    await wait_for(lambda: (NS, "pool", "hpa web", False) in operator.recorder.triggers, timeout=3)


async def test_410_gone_relists(operator: Running) -> None:
    hpas = kmock_lib.resource("autoscaling", "v2", "horizontalpodautoscalers")
    # list, watch -> 410 Gone -> list again, watch again
    await wait_for(
        lambda: len(list(operator.kmock["watch", hpas])) >= 2 and len(list(operator.kmock["list", hpas])) >= 2
    )
    operator.recorder.triggers.clear()
    await operator.kmock.patch(
        f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/web/status",
        json={"status": {"currentReplicas": 5}},
    )
    await wait_for(lambda: "hpa web" in operator.reasons(), timeout=3)  # and events still flow


async def test_an_unrelated_hpa_does_not(operator: Running) -> None:
    await _create(operator.kmock, "autoscaling/v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", "other",
                  spec={"scaleTargetRef": {"kind": "Deployment", "name": "other"}, "maxReplicas": 3})
    operator.recorder.triggers.clear()
    await operator.kmock.patch(
        f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/other/status",
        json={"status": {"desiredReplicas": 3}},
    )
    await operator.kmock.patch(
        f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/web/status",
        json={"status": {"desiredReplicas": 3}},
    )
    await wait_for(lambda: "hpa web" in operator.reasons())
    assert "hpa other" not in operator.reasons()


async def test_deployment_and_its_pods_trigger_but_other_pods_do_not(operator: Running) -> None:
    operator.recorder.triggers.clear()
    await operator.kmock.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/web", json={"spec": {"replicas": 6}})
    await wait_for(lambda: "deployment web" in operator.reasons())
    for name, app in (("stranger", "other"), ("web-1", "web")):
        await _create(operator.kmock, "v1", "pods", "Pod", name, labels={"app": app}, status={"phase": "Pending"})
    await wait_for(lambda: "pod web-1" in operator.reasons())
    await operator.kmock.patch(
        f"/api/v1/namespaces/{NS}/pods/web-1/status", json={"status": {"phase": "Running", "podIP": "127.0.0.1"}}
    )
    await wait_for(lambda: operator.reasons().count("pod web-1") >= 2)  # a status-only pod change too
    assert "pod stranger" not in operator.reasons()


async def test_a_spec_change_triggers_a_full_round(operator: Running) -> None:
    operator.recorder.triggers.clear()
    await operator.kmock.patch(
        f"/apis/fetchpool.io/v1alpha1/namespaces/{NS}/fetchpools/pool", json={"spec": {"connectionBudget": 90}}
    )
    await wait_for(lambda: any(r.startswith("fetchpool") and full for _, _, r, full in operator.recorder.triggers))


async def test_liveness_and_metrics_endpoints(operator: Running) -> None:
    def get(url: str) -> tuple[str, str]:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode()), response.headers["Content-Type"]

    health = json.loads((await asyncio.to_thread(get, operator.liveness))[0])
    assert 0 <= health["seconds_since_last_event"] < 60
    text, content_type = await asyncio.to_thread(get, operator.metrics)
    assert content_type.startswith("text/plain; version=0.0.4")
    silence = next(
        line for line in text.splitlines() if line.startswith("fetchpool_operator_seconds_since_last_event ")
    )
    assert 0 <= float(silence.split()[1]) < 60


async def test_deleting_a_fetchpool_hands_its_deployment_to_the_next_one(operator: Running) -> None:
    await _create(operator.kmock, "fetchpool.io/v1alpha1", "fetchpools", "FetchPool", "second",
                  spec={"target": {"name": "web"}, "connectionBudget": 90})
    await wait_for(lambda: any(n == "second" for _, n, _, _ in operator.recorder.triggers))
    operator.recorder.triggers.clear()
    response = await operator.kmock.delete(f"/apis/fetchpool.io/v1alpha1/namespaces/{NS}/fetchpools/pool")
    assert response.status == 200
    await wait_for(lambda: (NS, "second", "fetchpool pool deleted", False) in operator.recorder.triggers)
    assert (NS, "pool") in operator.recorder.forgotten


def test_a_silent_watch_fails_the_probe() -> None:
    now = [0.0]
    health = Health(clock=lambda: now[0], max_silence_seconds=100)
    health.event()
    now[0] = 500.0
    assert health.probe() == 500.0  # no FetchPool known: silence is normal
    health.watched_pools = 1
    with pytest.raises(RuntimeError, match="no watch event for 500s"):
        health.probe()
    health.event()
    assert health.probe() == 0.0


async def test_watch_timeouts_are_set_at_startup() -> None:
    settings = kopf.OperatorSettings()
    registry = kopf.OperatorRegistry()
    config = HandlerSettings(watch_server_timeout=45, watch_client_timeout=75, watch_inactivity_timeout=70, login=False)
    register(registry, Recorder(), config)  # type: ignore[arg-type]
    handlers = {h.id: h for h in registry._activities._handlers}
    await handlers["configure"].fn(settings=settings)  # type: ignore[call-arg]
    await handlers["cleanup"].fn()  # type: ignore[call-arg]
    assert settings.watching.server_timeout == 45 and settings.watching.client_timeout == 75
    assert settings.watching.inactivity_timeout == 70 and settings.watching.connect_timeout == 10
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)


async def test_a_paused_peer_stops_its_resync_loop(kmock: Any) -> None:
    """kopf pauses this operator while a peer of a higher priority is alive on the same peering object;
    its own resync loop then stops too (it asks the peering object), and starts again after."""
    kmock.resources.load_bundled()
    kmock.resources[FP] = kmock.ResourceInfo(
        kind="FetchPool", namespaced=True, subresources={"status"}, verbs={"get", "list", "watch", "patch", "create"}
    )
    peerings = "kopf.dev/v1/clusterkopfpeerings"
    kmock.resources[peerings] = kmock.ResourceInfo(
        kind="ClusterKopfPeering", namespaced=False, verbs={"get", "list", "watch", "patch", "create"}
    )
    url = str(kmock.url).rstrip("/")
    await kmock.post(
        "/apis/kopf.dev/v1/clusterkopfpeerings",
        json={"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "fleet"}},
    )
    await _create(kmock, "fetchpool.io/v1alpha1", "fetchpools", "FetchPool", "pool",
                  spec={"target": {"name": "web"}, "connectionBudget": 60})
    import kubernetes
    from fetchpool.operator.k8s import KubeIO
    from fetchpool.operator.peering import PeeringGate

    kube = KubeIO(kubernetes.client.ApiClient(kubernetes.client.Configuration(host=url)), request_timeout=5)
    gate = PeeringGate(lambda ns: kube.get_peering(ns, "fleet"), identity="me", priority=0, clusterwide=True)
    recorder = Recorder(gate=gate)
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:  # test only: point kopf at the emulator
        return kopf.ConnectionInfo(server=url, scheme="Bearer", token="test")

    register(registry, recorder, HandlerSettings(resync_seconds=0.2, login=False))  # type: ignore[arg-type]
    stop = threading.Event()
    thread = threading.Thread(
        target=lambda: asyncio.run(
            kopf.operator(
                registry=registry,
                peering_name="fleet",
                priority=0,
                identity="me",  # type: ignore[arg-type]
                clusterwide=True,
                stop_flag=stop,
            )
        ),
        daemon=True,
    )
    thread.start()

    def resyncs() -> int:
        return sum(1 for _, _, reason, _ in recorder.triggers if reason == "resync timer")

    def peer(priority: int) -> dict[str, Any]:
        seen = datetime.datetime.now(datetime.UTC).isoformat()
        return {"status": {"debugger": {"priority": priority, "lifetime": 60, "lastseen": seen}}}

    try:
        await wait_for(lambda: resyncs() >= 2, timeout=10)  # in charge: the loop runs
        response = await kmock.patch("/apis/kopf.dev/v1/clusterkopfpeerings/fleet", json=peer(100))
        assert response.status == 200
        # kopf sees the peer and pauses; the gate's answer is 1 s old at most, a resync period is
        # 0.2 s: no resync for 1.3 s means paused (a loaded machine takes longer to get there).
        loop = asyncio.get_running_loop()
        paused_at, quiet_since, given_up = resyncs(), loop.time(), loop.time() + 10
        while loop.time() - quiet_since < 1.3:
            assert loop.time() < given_up, "the peer never paused"
            await asyncio.sleep(0.1)
            if resyncs() != paused_at:
                paused_at, quiet_since = resyncs(), loop.time()
        await asyncio.sleep(1.5)
        assert resyncs() == paused_at, "a paused peer went on resyncing"
        assert not await gate("default") and not await recorder.may_act("default")
        await kmock.patch("/apis/kopf.dev/v1/clusterkopfpeerings/fleet", json={"status": {"debugger": None}})
        await wait_for(lambda: resyncs() >= paused_at + 2, timeout=10)  # the peer is gone: it resumes
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 10)
        kube.api_client.close()
    assert not thread.is_alive()


def test_kopfs_peering_rule() -> None:
    from fetchpool.operator.peering import in_charge

    now = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
    alive = {"lifetime": 60, "lastseen": "2026-01-01T11:59:30+00:00"}
    dead = {"lifetime": 60, "lastseen": "2026-01-01T11:58:00+00:00"}
    assert in_charge({}, identity="me", priority=0, now=now)
    assert in_charge({"me": {**alive, "priority": 0}}, identity="me", priority=0, now=now)
    assert not in_charge({"other": {**alive, "priority": 5}}, identity="me", priority=0, now=now)
    assert not in_charge({"other": {**alive, "priority": 0}}, identity="me", priority=0, now=now)  # same: all pause
    assert in_charge({"other": {**alive, "priority": 0}}, identity="me", priority=1, now=now)
    assert in_charge({"other": {**dead, "priority": 9}}, identity="me", priority=0, now=now)
