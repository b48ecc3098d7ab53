"""One reconciliation round (``fetchpool.operator.reconciler``) against an emulated Kubernetes API.

There is no real Kubernetes API server on these machines: ``kmock`` (by the kopf author) is a
stateful API emulator over real HTTP on loopback, so the operator's real ``KubeIO`` (the official
``kubernetes`` client) talks HTTP to it. Its limits: no resourceVersion, merge-only patches, lists
ignore label selectors (``KubeIO`` filters again client-side). The pods' gRPC side is replaced by a
recording fake delivery here; ``test_operator_delivery.py`` and ``tests/operator/`` use real gRPC.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from fetchpool.operator import resource
from fetchpool.operator.delivery import PodOutcome, PodTarget, PoolExtras
from fetchpool.operator.health import Health
from fetchpool.operator.k8s import KubeIO
from fetchpool.operator.policy import Limits
from fetchpool.operator.reconciler import Reconciler

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

NS = "default"
FP = "fetchpool.io/v1alpha1/fetchpools"
HPA = "autoscaling/v2/horizontalpodautoscalers"
DEPLOY = "apps/v1/deployments"
POD = "v1/pods"
CM = "v1/configmaps"


@dataclass
class FakeDelivery:
    log: list[tuple[str, Any]]
    fail: set[str] = field(default_factory=set)
    demand_by_pod: dict[str, dict[str, float]] = field(default_factory=dict)
    pushed: list[tuple[str, int]] = field(default_factory=list)

    async def push(
        self, pods: Sequence[PodTarget], limits: Mapping[str, Limits], extras: PoolExtras | None = None
    ) -> list[PodOutcome]:
        out = []
        for pod in pods:
            n = limits["*"].max_connections
            self.log.append(("push", (pod.name, n)))
            if pod.name in self.fail:
                out.append(
                    PodOutcome(
                        name=pod.name,
                        address=pod.address,
                        ok=False,
                        error="DEADLINE_EXCEEDED: no answer within the delivery timeout",
                    )
                )
            else:
                self.pushed.append((pod.name, n))
                out.append(
                    PodOutcome(name=pod.name, address=pod.address, ok=True, in_force={"direct": n}, changed=True)
                )
        return out

    async def demand(self, pods: Sequence[PodTarget]) -> dict[str, dict[str, float]]:
        return {p.name: self.demand_by_pod[p.name] for p in pods if p.name in self.demand_by_pod}


class LoggingKube(KubeIO):
    log: list[tuple[str, Any]]

    async def write_configmap(self, namespace: str, name: str, data: Mapping[str, str], **kw: Any) -> None:
        self.log.append(("cm", json.loads(data[resource.LIMITS_KEY])["max_connections"]))
        await super().write_configmap(namespace, name, data, **kw)

    async def patch_fetchpool_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.log.append(("status", dict(status)))
        await super().patch_fetchpool_status(namespace, name, status)


class World:
    """The emulated cluster plus a reconciler wired to it."""

    def __init__(self, kmock: Any) -> None:
        self.kmock = kmock
        kmock.resources.load_bundled()
        kmock.resources[FP] = kmock.ResourceInfo(
            kind="FetchPool",
            namespaced=True,
            subresources={"status"},
            verbs={"get", "list", "watch", "patch", "create"},
        )
        self.now = 1_000.0
        self.log: list[tuple[str, Any]] = []
        api = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=str(kmock.url).rstrip("/")))
        self.kube = LoggingKube(api, request_timeout=5)
        self.kube.log = self.log
        self.delivery = FakeDelivery(self.log)
        self.reconciler = Reconciler(self.kube, self.delivery, Health(), retry_seconds=60, clock=lambda: self.now)

    def fetchpool(self, spec: Mapping[str, Any], status: Mapping[str, Any] | None = None) -> None:
        body: dict[str, Any] = {
            "apiVersion": "fetchpool.io/v1alpha1",
            "kind": "FetchPool",
            "metadata": {"name": "pool", "namespace": NS, "uid": "fp-uid"},
            "spec": dict(spec),
        }
        if status:
            body["status"] = dict(status)
        self.kmock.objects[FP, NS, "pool"] = body

    def deployment(self, replicas: int) -> None:
        self.kmock.objects[DEPLOY, NS, "web"] = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}}},
            "status": {"replicas": replicas},
        }

    def hpa(self, current: int, desired: int) -> None:
        self.kmock.objects[HPA, NS, "web"] = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "minReplicas": 2,
                "maxReplicas": 8,
            },
            "status": {"currentReplicas": current, "desiredReplicas": desired},
        }

    def pod(
        self, name: str, *, ready: bool = True, terminating: bool = False, labels: Mapping[str, str] | None = None
    ) -> None:
        meta: dict[str, Any] = {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "labels": dict(labels or {"app": "web"}),
            "annotations": {"fetchpool.io/grpc-port": str(6000 + len(name))},
        }
        if terminating:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        self.kmock.objects[POD, NS, name] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "status": {
                "phase": "Running" if ready else "Pending",
                "podIP": "127.0.0.1" if ready else None,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }

    def remove_pod(self, name: str) -> None:
        self.kmock.objects[POD, NS, name].delete()

    @property
    def status(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.kmock.objects[FP, NS, "pool"].raw.get("status") or {}))

    def conditions(self) -> dict[str, dict[str, Any]]:
        return {c["type"]: c for c in self.status.get("conditions", [])}

    def cm_limits(self) -> dict[str, Any] | None:
        try:
            cm = self.kmock.objects[CM, NS, "pool-limits"]
        except KeyError:
            return None
        return None if cm.deleted else json.loads(cm.raw["data"][resource.LIMITS_KEY])

    async def round(self, *, full: bool = False) -> Any:
        self.log.clear()
        return await self.reconciler.reconcile(NS, "pool", full=full)


def closed(node: Any) -> Any:
    """The CRD's status schema as JSON Schema, with unknown fields forbidden: the API server prunes
    fields a structural schema does not declare, so every field the operator writes must be there."""
    if isinstance(node, dict):
        out = {k: closed(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
        if node.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    return [closed(v) for v in node] if isinstance(node, list) else node


def check_status_schema(status: Mapping[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "helm/fetchpool/crds/fetchpool.io_fetchpools.yaml").read_text()
    )
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    jsonschema.Draft4Validator(closed(schema)).validate(status)


SPEC = {"target": {"name": "web"}, "connectionBudget": 60, "keepaliveShare": 0.5, "stabilizationSeconds": 10}


@pytest.fixture
async def world(kmock: Any) -> Any:
    w = World(kmock)
    yield w
    await w.reconciler.close()


async def test_divides_the_budget_and_records_it(world: World) -> None:
    world.fetchpool(SPEC)
    world.deployment(2)
    world.hpa(2, 2)
    world.pod("a")
    world.pod("b")
    await world.round()
    assert sorted(world.delivery.pushed) == [("a", 30), ("b", 30)]
    assert world.cm_limits() == {"max_connections": 30, "max_keepalive_connections": 15}
    status = world.status
    assert status["observedReplicas"] == 2 and status["fleetConnections"] == 60
    assert status["limits"] == {"maxConnections": 30, "maxKeepaliveConnections": 15}
    assert status["appliedAt"] == resource.format_time(1_000.0)
    assert status["delivery"] == {"ready": 2, "confirmed": 2, "unreachable": []}
    assert status["replicas"] == {
        "current": 2,
        "desired": 2,
        "deployment": 2,
        "pods": 2,
        "ready": 2,
        "terminating": 0,
        "holders": 2,
    }
    conds = world.conditions()
    assert conds["Ready"]["status"] == "True" and conds["Ready"]["reason"] == "LimitsApplied"
    assert conds["Degraded"]["status"] == "False"
    cm = world.kmock.objects[CM, NS, "pool-limits"]
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "FetchPool"
    check_status_schema(status)


async def test_a_repeated_round_changes_nothing(world: World) -> None:
    world.fetchpool(SPEC)
    world.deployment(2)
    world.hpa(2, 2)
    world.pod("a")
    world.pod("b")
    await world.round()
    world.now += 5
    result = await world.round()
    assert world.log == [] and not result.status_written  # idempotent: no push, no write
    await world.round(full=True)  # the timer's round re-delivers (pods may have been changed by hand)
    assert [entry[0] for entry in world.log] == ["push", "push"]


async def test_status_only_hpa_scale_up_shrinks_configmap_first(world: World) -> None:
    world.fetchpool(SPEC)
    world.deployment(2)
    world.hpa(2, 2)
    world.pod("a")
    world.pod("b")
    await world.round()
    world.hpa(2, 6)  # only the HPA's status moved
    world.now += 1
    await world.round()
    kinds = [(k, v) for k, v in world.log if k != "status"]
    assert kinds[0] == ("cm", 10)  # new pods read 10 from the ConfigMap ...
    assert sorted(v for k, v in kinds[1:]) == [("a", 10), ("b", 10)]  # ... and the old ones shrink
    assert world.status["observedReplicas"] == 6 and world.status["fleetConnections"] == 60


async def test_scale_down_grows_after_terminating_pods_are_gone_and_the_window(world: World) -> None:
    world.fetchpool({**SPEC, "stabilizationSeconds": 10})
    world.deployment(6)
    world.hpa(6, 6)
    for name in "abcdef":
        world.pod(name)
    await world.round()
    assert world.cm_limits() == {"max_connections": 10, "max_keepalive_connections": 5}
    world.hpa(6, 3)
    world.deployment(3)
    for name in "def":
        world.pod(name, terminating=True)
    world.now += 1
    await world.round()
    assert world.status["observedReplicas"] == 6 and world.status["limits"]["maxConnections"] == 10
    for name in "def":
        world.remove_pod(name)
    world.hpa(3, 3)
    world.now += 1
    await world.round()
    assert world.status["limits"]["maxConnections"] == 10
    assert world.status["pending"]["limits"]["maxConnections"] == 20
    assert world.status["pending"]["notBefore"] == resource.format_time(1_012.0)
    assert "change to 20 per replica pending until" in world.conditions()["Ready"]["message"]
    check_status_schema(world.status)
    world.now += 10
    await world.round()
    kinds = [(k, v) for k, v in world.log if k != "status"]
    assert sorted(v for k, v in kinds[:-1]) == [("a", 20), ("b", 20), ("c", 20)]
    assert kinds[-1] == ("cm", 20)  # grown pods first, the ConfigMap last
    assert "pending" not in world.status and world.status["fleetConnections"] == 60


async def test_budget_below_minimum_is_degraded(world: World) -> None:
    world.fetchpool({**SPEC, "connectionBudget": 50, "minPerReplica": 10})
    world.deployment(6)
    world.hpa(6, 6)
    await world.round()
    conds = world.conditions()
    assert conds["Degraded"]["status"] == "True" and conds["Degraded"]["reason"] == "BudgetBelowMinimum"
    assert conds["Degraded"]["message"] == (
        "connection budget 50 is below 6 replicas x minPerReplica 10 = 60: each replica gets minPerReplica, "
        "the fleet may open 60 connections (10 over budget)"
    )
    assert world.status["limits"]["maxConnections"] == 10


@pytest.mark.parametrize(
    ("spec", "setup", "reason", "message"),
    [
        (
            {"connectionBudget": 60},
            "all",
            "InvalidSpec",
            "spec.target.name is missing: name the Deployment whose replicas divide the budget",
        ),
        (
            {**SPEC, "connectionBudget": -1, "minPerReplica": -2},
            "all",
            "InvalidSpec",
            "spec.connectionBudget must be >= 1 connection, got -1; spec.minPerReplica must be >= 1 connection, got -2",
        ),
        (
            SPEC,
            "no-hpa",
            "HPANotFound",
            "no HorizontalPodAutoscaler in namespace default has scaleTargetRef Deployment/web",
        ),
        (
            {**SPEC, "target": {"name": "web", "hpaName": "other"}},
            "all",
            "HPANotFound",
            "HorizontalPodAutoscaler default/other (spec.target.hpaName) not found",
        ),
        (
            {**SPEC, "target": {"name": "nope"}},
            "all",
            "TargetNotFound",
            "Deployment default/nope (spec.target.name) not found",
        ),
    ],
)
async def test_bad_input_keeps_the_last_good_limits(
    world: World, spec: dict[str, Any], setup: str, reason: str, message: str
) -> None:
    world.fetchpool(SPEC)
    world.deployment(2)
    world.hpa(2, 2)
    world.pod("a")
    world.pod("b")
    await world.round()  # last good: 30 per replica
    world.fetchpool(spec, status=world.status)
    if setup == "no-hpa":
        world.kmock.objects[HPA, NS, "web"].delete()
    world.hpa(8, 8) if setup != "no-hpa" else None  # a change that would shrink the pods
    world.now += 1
    await world.round()
    assert [k for k, _ in world.log] == ["status"]  # no push, no ConfigMap write
    assert world.cm_limits() == {"max_connections": 30, "max_keepalive_connections": 15}
    conds = world.conditions()
    assert conds["Degraded"] == {**conds["Degraded"], "status": "True", "reason": reason, "message": message}
    assert conds["Ready"]["status"] == "False"
    assert conds["Ready"]["message"] == message + "; pods keep their last good limits (30 per replica)"
    assert world.status["limits"]["maxConnections"] == 30
    check_status_schema(world.status)


async def test_an_unreachable_pod_is_reported_and_retried(world: World) -> None:
    world.fetchpool(SPEC)
    world.deployment(3)
    world.hpa(3, 3)
    for name in "abc":
        world.pod(name)
    world.delivery.fail = {"b"}
    await world.round()
    assert sorted(world.delivery.pushed) == [("a", 20), ("c", 20)]
    status = world.status
    assert status["delivery"]["confirmed"] == 2
    [unreachable] = status["delivery"]["unreachable"]
    assert unreachable["pod"] == "b" and unreachable["error"].startswith("DEADLINE_EXCEEDED")
    conds = world.conditions()
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "PodsUnreachable"
    assert conds["Degraded"]["reason"] == "PodsUnreachable"
    assert conds["Degraded"]["message"].startswith("1 of 3 ready pods did not take the limits, retrying every 60s: b (")
    check_status_schema(status)
    state = world.reconciler._keys[(NS, "pool")]
    assert state.timer is not None and not state.timer.done()  # the retry is scheduled

    world.delivery.fail = set()
    world.delivery.pushed.clear()
    world.now += 60
    await world.round()
    assert world.delivery.pushed == [("b", 20)]  # only the pod that missed it
    assert world.status["delivery"] == {"ready": 3, "confirmed": 3, "unreachable": []}
    assert world.conditions()["Ready"]["status"] == "True"


async def test_pods_of_other_deployments_do_not_count(world: World) -> None:
    world.fetchpool(SPEC)
    world.deployment(2)
    world.hpa(2, 2)
    world.pod("a")
    world.pod("b")
    world.pod("stranger", labels={"app": "other"})  # kmock ignores the selector; KubeIO filters again
    await world.round()
    assert world.status["observedReplicas"] == 2
    assert sorted(n for n, _ in world.delivery.pushed) == ["a", "b"]


async def test_formula_mode_uses_measured_demand(world: World) -> None:
    world.fetchpool(
        {
            **SPEC,
            "connectionBudget": 600,
            "mode": "formula",
            "formula": {"latencySeconds": 0.3, "processingTimeSeconds": 0.1},
        }
    )
    world.deployment(2)
    world.hpa(2, 2)
    world.pod("a")
    world.pod("b")
    world.delivery.demand_by_pod = {"a": {"direct": 6}, "b": {"direct": 4}}
    await world.round()
    # mean demand 5 requests in flight + queued -> 5 * (1 + 0.3 / 0.1) = 20 per replica (<= 600 / 2)
    assert world.status["limits"]["maxConnections"] == 20
    assert world.conditions()["Degraded"]["status"] == "False"


async def test_writes_retry_on_409_conflicts() -> None:
    from fetchpool.operator.k8s import ConflictError, retry_on_conflict
    from kubernetes.client.exceptions import ApiException

    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ApiException(status=409, reason="Conflict")
        return "written"

    assert await retry_on_conflict(flaky, base_delay=0.001) == "written" and len(calls) == 3

    async def always() -> None:
        raise ApiException(status=409, reason="Conflict")

    with pytest.raises(ConflictError, match="still conflicting after 4 attempts"):
        await retry_on_conflict(always, attempts=4, base_delay=0.001)

    async def forbidden() -> None:
        raise ApiException(status=403, reason="Forbidden")

    with pytest.raises(ApiException):  # anything else is not retried here
        await retry_on_conflict(forbidden, base_delay=0.001)
