"""End to end: the real operator process keeps real service processes within the connection budget.

A real loop, not a call of a handler:

- the Kubernetes API is ``kmock``'s ``KubernetesEmulator``, a stateful API emulator over real HTTP
  on loopback (there is no real Kubernetes API server on these machines; kmock keeps no
  resourceVersion, treats patches as merge patches and ignores label selectors on lists). The test
  plays the HPA controller, the Deployment controller and the kubelet by patching objects over HTTP;
- the "pods" are ``fetchpool serve`` processes on 127.0.0.1, registered as Pod objects whose
  ``fetchpool.io/grpc-port`` annotation gives each its port;
- the operator runs as its own process (``python -m fetchpool.operator``), logging in through a
  kubeconfig that points at the emulator, exactly as in a cluster.

Scenario (budget 60 connections): 2 replicas at 30; the HPA's *status* alone says 6 (the operator
must shrink the running pods to 10 within 5 s); the Deployment grows, two late pods start from the
ConfigMap (they must come up with 10), one pod stays Pending and one is Ready but never answers
(it must be reported, and must not block the others); the HPA says 3, three pods terminate (no pod
may grow while they exist), then they are gone (the three survivors must reach 20 within 5 s).
Throughout, the limits in force, read from the pods' own GetPoolStats every 100 ms, never sum to
more than the budget.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fleet import (
    CONFIGMAP,
    FETCHPOOL,
    NS,
    Sampler,
    ServicePod,
    free_port,
    limits_of,
    pod_object,
    ready_status,
    wait_until,
    write_kubeconfig,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")]

BUDGET = 60
DEADLINE = 5.0  # seconds from an HPA change to the limits being in force on every ready pod
REPO = Path(__file__).resolve().parents[2]


class Cluster:
    """The emulated API plus the test's roles (HPA controller, Deployment controller, kubelet)."""

    def __init__(self, kmock: Any, tmp: Path) -> None:
        self.kmock = kmock
        self.tmp = tmp
        self.pods: dict[str, ServicePod] = {}

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        response = (
            await getattr(self.kmock, method)(path, json=body)
            if body is not None
            else await getattr(self.kmock, method)(path)
        )
        text = await response.text()
        assert response.status == 200, f"{method.upper()} {path}: {response.status} {text[:500]}"
        return json.loads(text) if text else None

    async def create(self, path: str, body: dict[str, Any]) -> None:
        await self.request("post", path, body)

    async def hpa_status(self, **status: int) -> None:
        await self.request(
            "patch", f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/web/status", {"status": status}
        )

    async def deployment_replicas(self, replicas: int) -> None:
        await self.request(
            "patch",
            f"/apis/apps/v1/namespaces/{NS}/deployments/web",
            {"spec": {"replicas": replicas}, "status": {"replicas": replicas}},
        )

    async def add_pod(self, name: str, *, port: int | None = None, ready: bool = False) -> None:
        await self.create(f"/api/v1/namespaces/{NS}/pods", pod_object(name, port=port, ready=ready))

    async def mark_ready(self, name: str, port: int) -> None:
        """The pod's container listens on ``port`` (loopback stands in for the pod IP) and is Ready."""
        await self.request(
            "patch",
            f"/api/v1/namespaces/{NS}/pods/{name}",
            {"metadata": {"annotations": {"fetchpool.io/grpc-port": str(port)}}},
        )
        await self.request("patch", f"/api/v1/namespaces/{NS}/pods/{name}/status", {"status": ready_status()})

    async def terminate_pod(self, name: str) -> None:
        await self.request("delete", f"/api/v1/namespaces/{NS}/pods/{name}")  # finalizer: Terminating

    async def pod_gone(self, name: str) -> None:
        await self.request("patch", f"/api/v1/namespaces/{NS}/pods/{name}", {"metadata": {"finalizers": []}})

    def fetchpool_status(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.kmock.objects[FETCHPOOL, NS, "pool"].raw.get("status") or {}))

    def configmap_limits(self) -> dict[str, Any] | None:
        try:
            cm = self.kmock.objects[CONFIGMAP, NS, "pool-limits"]
        except KeyError:
            return None
        return None if cm.deleted else json.loads(cm.raw["data"]["limits.json"])

    def project_configmap(self, pod: str) -> Path:
        """The kubelet's projection of the ConfigMap volume into a new pod (read at its start)."""
        path = self.tmp / f"{pod}-limits.json"
        limits = self.configmap_limits()
        path.write_text(json.dumps(limits) if limits is not None else "{}")
        return path

    async def start_pod(self, name: str, limits_file: Path) -> ServicePod:
        pod = ServicePod(name=name, port=free_port(), log=self.tmp / f"{name}.log")
        self.pods[name] = pod
        await pod.start(limits_file)
        return pod


@pytest.fixture
async def cluster(kmock: Any, tmp_path: Path) -> AsyncIterator[Cluster]:
    kmock.resources.load_bundled()
    kmock.resources[FETCHPOOL] = kmock.ResourceInfo(
        kind="FetchPool", namespaced=True, subresources={"status"}, verbs={"get", "list", "watch", "patch", "create"}
    )
    c = Cluster(kmock, tmp_path)
    try:
        yield c
    finally:
        await asyncio.gather(*(pod.stop() for pod in c.pods.values()))


async def start_operator(kmock: Any, tmp: Path, liveness: str, metrics: str) -> asyncio.subprocess.Process:
    kubeconfig = write_kubeconfig(tmp / "kubeconfig", str(kmock.url).rstrip("/"))
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fetchpool.operator",
        "--all-namespaces",
        "--standalone",
        "--liveness",
        liveness,
        "--metrics",
        metrics,
        "--delivery-timeout",
        "1",
        "--retry-interval",
        "1",
        "--resync-interval",
        "10",
        "--verbose",
        stdout=(tmp / "operator.log").open("wb"),
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )


async def all_at(pods: list[ServicePod], limit: int) -> bool:
    found = await asyncio.gather(*(limits_of(p.address) for p in pods))
    return all(f is not None and set(f.values()) == {limit} for f in found)


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


async def configmap_becomes(cluster: Cluster, limits: dict[str, int]) -> None:
    """When limits grow, the ConfigMap gets them after the pods do (reconciler steps 1-3): wait for it."""

    async def written() -> bool:
        return cluster.configmap_limits() == limits

    await wait_until(written, timeout=5, what=f"the ConfigMap gets {limits} after the pods")


async def test_limits_follow_the_hpa_within_budget(cluster: Cluster, tmp_path: Path) -> None:
    timings: dict[str, float] = {}
    # --- the initial world: 2 replicas, started with small limits from an old ConfigMap ----------
    await cluster.create(
        f"/apis/apps/v1/namespaces/{NS}/deployments",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}},
            "status": {"replicas": 2},
        },
    )
    await cluster.create(
        f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers",
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "minReplicas": 2,
                "maxReplicas": 8,
                "metrics": [
                    {
                        "type": "Pods",
                        "pods": {
                            "metric": {"name": "fetchpool_demand_requests"},
                            "target": {"type": "AverageValue", "averageValue": "20"},
                        },
                    }
                ],
            },
            "status": {"currentReplicas": 2, "desiredReplicas": 2},
        },
    )
    old = tmp_path / "old-limits.json"
    old.write_text(json.dumps({"max_connections": 5, "max_keepalive_connections": 2}))
    p0, p1 = await asyncio.gather(cluster.start_pod("web-0", old), cluster.start_pod("web-1", old))
    for pod in (p0, p1):
        await cluster.add_pod(pod.name, port=pod.port, ready=True)
    await cluster.create(
        f"/apis/fetchpool.io/v1alpha1/namespaces/{NS}/fetchpools",
        {
            "apiVersion": "fetchpool.io/v1alpha1",
            "kind": "FetchPool",
            "metadata": {"name": "pool", "namespace": NS, "uid": "fetchpool-uid"},
            "spec": {
                "target": {"name": "web"},
                "connectionBudget": BUDGET,
                "minPerReplica": 1,
                "maxPerReplica": 100,
                "keepaliveShare": 0.5,
                "mode": "budget",
                "stabilizationSeconds": 1,
            },
        },
    )

    sampler = Sampler(cluster.pods, interval=0.1)
    sampler.start()
    liveness, metrics = f"http://127.0.0.1:{free_port()}/healthz", f"http://127.0.0.1:{free_port()}/metrics"
    operator = await start_operator(cluster.kmock, tmp_path, liveness, metrics)
    started = time.monotonic()
    blackhole = socket.socket()  # a "pod" that accepts connections and never answers
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)
    try:
        timings["start: 2 pods at 30"] = await wait_until(
            lambda: all_at([p0, p1], 30), timeout=20, what="operator start-up: 2 replicas at 60/2"
        )
        await configmap_becomes(cluster, {"max_connections": 30, "max_keepalive_connections": 15})
        await asyncio.sleep(0.3)  # let the sampler see the fleet exactly at its budget

        # --- 2 -> 6: the HPA's status alone changes (a status-only event) -----------------------------
        t1 = time.monotonic()
        await cluster.hpa_status(desiredReplicas=6)
        timings["2->6: running pods at 10"] = await wait_until(
            lambda: all_at([p0, p1], 10), timeout=DEADLINE, what="2 -> 6: running pods shrink to 60/6 = 10"
        )
        # The Deployment controller and the scheduler follow.
        await cluster.deployment_replicas(6)
        for name in ("web-2", "web-3", "web-4", "web-5"):
            await cluster.add_pod(name)
        await cluster.hpa_status(currentReplicas=6)
        # The kubelet starts web-2 and web-3 from the ConfigMap, as it is now.
        p2, p3 = await asyncio.gather(
            cluster.start_pod("web-2", cluster.project_configmap("web-2")),
            cluster.start_pod("web-3", cluster.project_configmap("web-3")),
        )
        for pod in (p2, p3):  # before Ready: the operator cannot know their address yet
            assert await limits_of(pod.address) == {"direct": 10}, f"{pod.name} did not start with the new limits"
            await cluster.mark_ready(pod.name, pod.port)
        # web-4 stays Pending; web-5 is Ready but its address never answers.
        await cluster.mark_ready("web-5", blackhole.getsockname()[1])

        async def silent_pod_reported() -> bool:
            unreachable = (cluster.fetchpool_status().get("delivery") or {}).get("unreachable") or []
            return [u["pod"] for u in unreachable] == ["web-5"]

        timings["2->6: silent pod reported"] = await wait_until(
            silent_pod_reported, timeout=DEADLINE, what="the silent pod is reported"
        )
        assert await all_at([p0, p1, p2, p3], 10)
        status = cluster.fetchpool_status()
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Degraded"]["status"] == "True" and conditions["Degraded"]["reason"] == "PodsUnreachable"
        assert "web-5" in conditions["Degraded"]["message"]
        assert status["observedReplicas"] == 6 and status["limits"]["maxConnections"] == 10
        assert status["delivery"]["confirmed"] == 4

        # --- 6 -> 3: three pods terminate, then they are gone ----------------------------------------
        t2 = time.monotonic()
        await cluster.hpa_status(desiredReplicas=3)
        await cluster.deployment_replicas(3)
        for name in ("web-3", "web-4", "web-5"):
            await cluster.terminate_pod(name)
        await asyncio.sleep(1.5)  # the terminating pods drain (longer than stabilizationSeconds)
        assert await all_at([p0, p1, p2], 10), "a pod grew while others were still terminating"
        await p3.stop()
        for name in ("web-3", "web-4", "web-5"):
            await cluster.pod_gone(name)
        t3 = time.monotonic()
        await cluster.hpa_status(currentReplicas=3)
        timings["6->3: survivors at 20"] = await wait_until(
            lambda: all_at([p0, p1, p2], 20), timeout=DEADLINE, what="6 -> 3: survivors grow to 60/3 = 20"
        )
        await configmap_becomes(cluster, {"max_connections": 20, "max_keepalive_connections": 10})

        async def recorded() -> bool:  # the status is written last in a round, after the pods
            s = cluster.fetchpool_status()
            conds = {c["type"]: c["status"] for c in s.get("conditions", [])}
            return (
                conds == {"Ready": "True", "Degraded": "False"}
                and s["delivery"]["unreachable"] == []
                and s["limits"]["maxConnections"] == 20
            )

        await wait_until(recorded, timeout=DEADLINE, what="status: 20 per replica, Ready, not Degraded")
        status = cluster.fetchpool_status()
        assert status["observedReplicas"] == 3 and status["fleetConnections"] == 60
        assert status["replicas"]["holders"] == 3 and status["appliedAt"]

        # --- the operator's own health ----------------------------------------------------------------
        probe = json.loads(await asyncio.to_thread(http_get, liveness))
        assert 0 <= probe["seconds_since_last_event"] < 30
        assert "fetchpool_operator_seconds_since_last_event" in await asyncio.to_thread(http_get, metrics)
    except BaseException:
        print((tmp_path / "operator.log").read_text()[-6000:])
        raise
    finally:
        await sampler.stop()
        blackhole.close()
        operator.terminate()
        try:
            await asyncio.wait_for(operator.wait(), 10)
        except TimeoutError:
            operator.kill()
            await operator.wait()

    # --- never over budget, at any sampled moment ---------------------------------------------------
    samples = sampler.samples
    elapsed = samples[-1].at - samples[0].at
    assert len(samples) >= 0.7 * elapsed / 0.1, (len(samples), elapsed)  # sampled about every 100 ms
    worst = max(samples, key=lambda s: s.total)
    assert worst.total <= BUDGET, f"over budget at +{worst.at - samples[0].at:.2f}s: {worst.limits}"
    assert worst.total == BUDGET  # the check is not vacuous: the fleet was driven up to the budget
    # No survivor grew before the terminating pods were gone.
    for sample in sampler.between(t2, t3):
        assert all(v <= 10 for v in sample.limits.values()), sample
    print(
        f"\ne2e: {len(samples)} samples over {elapsed:.1f}s, max fleet total {worst.total} <= {BUDGET};",
        ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
        f"(operator up {time.monotonic() - started:.1f}s)",
    )
    assert t1 < t2 < t3
