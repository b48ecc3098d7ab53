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
from fetchpool.operator.delivery import PodOutcome, PodPlan, PodTarget, PoolExtras
from fetchpool.operator.health import Health
from fetchpool.operator.k8s import KubeIO
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
    """The pods' PoolAdmin: every pod holds one pool, ``direct``, started at the start limit (1), as the
    chart starts them (``FETCHPOOL_MAX_CONNECTIONS`` = minPerReplica, then the limits file)."""

    log: list[tuple[str, Any]]
    fail: set[str] = field(default_factory=set)
    demand_by_pod: dict[str, dict[str, float]] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    pushed: list[tuple[str, int]] = field(default_factory=list)

    async def push(self, plans: Sequence[PodPlan], extras: PoolExtras | None = None) -> list[PodOutcome]:
        out = []
        for plan in plans:
            name, want = plan.target.name, plan.limits["*"].max_connections
            have = self.held.setdefault(name, 1)
            new = min(have, want) if plan.lower_only else want
            self.log.append(("push", (name, new)))
            if name in self.fail:
                out.append(
                    PodOutcome(
                        name=name,
                        address=plan.target.address,
                        ok=False,
                        error="DEADLINE_EXCEEDED: no answer within the delivery timeout",
                    )
                )
                continue
            if new != have:
                self.pushed.append((name, new))
            self.held[name] = new
            out.append(
                PodOutcome(
                    name=name, address=plan.target.address, ok=True, in_force={"direct": new}, changed=new != have
                )
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

    def fetchpool(
        self,
        spec: Mapping[str, Any],
        status: Mapping[str, Any] | None = None,
        *,
        name: str = "pool",
        created: str = "2026-01-01T00:00:00Z",
    ) -> None:
        body: dict[str, Any] = {
            "apiVersion": "fetchpool.io/v1alpha1",
            "kind": "FetchPool",
            "metadata": {"name": name, "namespace": NS, "uid": f"{name}-uid", "creationTimestamp": created},
            "spec": dict(spec),
        }
        if status:
            body["status"] = dict(status)
        self.kmock.objects[FP, NS, name] = body

    def deployment(self, replicas: int, *, surge: int | str = 0) -> None:
        self.kmock.objects[DEPLOY, NS, "web"] = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "web"}},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": 1}},
            },
            "status": {"replicas": replicas},
        }

    def hpa(self, current: int, desired: int, *, max_replicas: int = 8) -> None:
        self.kmock.objects[HPA, NS, "web"] = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "minReplicas": 2,
                "maxReplicas": max_replicas,
            },
            "status": {"currentReplicas": current, "desiredReplicas": desired},
        }

    def pod(
        self,
        name: str,
        *,
        ready: bool = True,
        started: bool | None = None,
        terminating: bool = False,
        labels: Mapping[str, str] | None = None,
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
                "phase": "Running" if (ready if started is None else started) else "Pending",
                "podIP": "127.0.0.1" if (ready if started is None else started) else None,
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
START = {"max_connections": 1, "max_keepalive_connections": 0}  # the limits file: minPerReplica 1


@pytest.fixture
async def world(kmock: Any) -> Any:
    w = World(kmock)
    yield w
    await w.reconciler.close()


async def test_divides_the_budget_and_records_it(world: World) -> None:
    world.fetchpool(SPEC)
    world.deployment(2)
    world.hpa(2, 2, max_replicas=4)  # ceiling 4: 2 pods may still start, 1 connection kept for each
    world.pod("a")
    world.pod("b")
    await world.round()
    assert sorted(world.delivery.pushed) == [("a", 29), ("b", 29)]  # (60 - 2) / 2, raised from the start limit
    assert world.cm_limits() == START
    status = world.status
    assert status["limits"] == {"maxConnections": 29, "maxKeepaliveConnections": 14}
    assert (status["startLimit"], status["ceiling"], status["limitSum"], status["reserved"]) == (1, 4, 58, 2)
    assert status["fleetConnections"] == 60 and status["observedReplicas"] == 2
    assert status["appliedAt"] == resource.format_time(1_000.0)
    assert status["delivery"] == {"ready": 2, "confirmed": 2, "unreachable": []}
    assert status["replicas"] == {
        "current": 2,
        "desired": 2,
        "deployment": 2,
        "deploymentStatus": 2,
        "pods": 2,
        "terminating": 0,
        "holders": 2,
        "ready": 2,
        "ceiling": 4,
    }
    assert status["hpa"] == "web"
    conds = world.conditions()
    assert conds["Ready"]["status"] == "True" and conds["Ready"]["reason"] == "LimitsApplied"
    assert conds["Ready"]["message"].startswith(
        "29 connections per ready replica (2 ready); the fleet may open 60 of 60"
    )
    assert conds["Degraded"]["status"] == "False" and conds["Conflict"]["status"] == "False"
    cm = world.kmock.objects[CM, NS, "pool-limits"]
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "FetchPool"
    check_status_schema(status)
    body, _ = world.reconciler.health.render()
    text = body.decode()
    labels = 'fetchpool="pool",namespace="default"'
    for line in (
        f"fetchpool_operator_budget_connections{{{labels}}} 60.0",
        f"fetchpool_operator_limit_sum_connections{{{labels}}} 58.0",
        f"fetchpool_operator_replicas{{{labels}}} 2.0",
        f"fetchpool_operator_per_replica_limit_connections{{{labels}}} 29.0",
        f"fetchpool_operator_pods_unconfirmed{{{labels}}} 0.0",
        f'fetchpool_operator_condition{{{labels},reason="LimitsApplied",status="True",type="Ready"}} 1.0',
    ):
        assert line in text, line


async def test_a_repeated_round_changes_nothing(world: World) -> None:
    world.fetchpool(SPEC)
    world.deployment(2)
    world.hpa(2, 2, max_replicas=2)
    world.pod("a")
    world.pod("b")
    await world.round()
    world.now += 5
    result = await world.round()
    assert world.log == [] and not result.status_written  # idempotent: no push, no write
    await world.round(full=True)  # the timer's round re-reads every pod (they may have been changed by hand)
    assert [entry[0] for entry in world.log] == ["push", "push"]


async def test_without_an_hpa_the_deployments_replicas_divide_and_kubectl_scale_re_divides(world: World) -> None:
    world.fetchpool(SPEC)
    world.deployment(2, surge="25%")  # nothing scales it: the ceiling is 2 + 1 (maxSurge)
    world.pod("a")
    world.pod("b")
    await world.round()
    assert world.status["limits"]["maxConnections"] == 29 and world.status["ceiling"] == 3
    assert world.status.get("hpa") is None and world.conditions()["Degraded"]["status"] == "False"
    world.deployment(3, surge="25%")  # kubectl scale --replicas=3
    world.pod("c", ready=False)  # created, pending
    world.now += 1
    await world.round()
    assert world.status["ceiling"] == 4  # 3 + 1
    # c pending counts at 1, one more may start: (60 - 1 - 1) / 2 = 29 - nothing to lower yet
    assert world.delivery.held == {"a": 29, "b": 29}
    world.pod("c")  # ready
    world.now += 1
    await world.round()
    assert world.delivery.held == {"a": 19, "b": 19, "c": 19}  # (60 - 1) / 3; a and b lowered before c grew
    pushes = [v for k, v in world.log if k == "push"]
    assert pushes.index(("c", 19)) > max(pushes.index(("a", 19)), pushes.index(("b", 19)))


async def test_a_scale_up_the_reserve_covers_needs_no_shrink_until_the_new_pods_are_ready(world: World) -> None:
    world.fetchpool(SPEC)
    world.deployment(2)
    world.hpa(2, 2, max_replicas=6)
    world.pod("a")
    world.pod("b")
    await world.round()
    assert world.delivery.held == {"a": 28, "b": 28}  # (60 - 4 x 1) / 2
    world.hpa(2, 6, max_replicas=6)  # only the HPA's status moved
    world.deployment(6)
    for name in "cdef":
        world.pod(name, ready=False)
    world.now += 1
    await world.round()
    assert [k for k, _ in world.log if k == "push"] == []  # 28 + 28 + 4 pending x 1 = 60: nothing to do
    for name in "cdef":
        world.pod(name)
    world.now += 1
    await world.round()
    assert world.delivery.held == dict.fromkeys("abcdef", 10)
    kinds = [v for k, v in world.log if k == "push"]
    assert kinds[:2] == [("a", 10), ("b", 10)]  # the old ones shrink first, then the new ones grow
    assert world.status["fleetConnections"] == 60 and world.status["reserved"] == 0


async def test_scale_down_grows_after_terminating_pods_are_gone_and_the_window(world: World) -> None:
    world.fetchpool({**SPEC, "stabilizationSeconds": 10})
    world.deployment(6)
    world.hpa(6, 6, max_replicas=6)
    for name in "abcdef":
        world.pod(name)
    await world.round()
    assert world.delivery.held == dict.fromkeys("abcdef", 10)
    world.hpa(6, 3, max_replicas=6)
    world.deployment(3)
    for name in "def":
        world.pod(name, terminating=True)
    world.now += 1
    await world.round()
    # d, e, f drain holding 10 each, and the slots they leave may take a new pod each (1):
    # a, b, c make room, (60 - 3 - 30) / 3 = 9 (and the draining ones follow them down).
    assert world.status["limits"]["maxConnections"] == 9
    assert world.delivery.held == dict.fromkeys("abcdef", 9)
    for name in "def":
        world.remove_pod(name)
    world.hpa(3, 3, max_replicas=6)
    world.now += 1
    await world.round()
    assert world.status["limits"]["maxConnections"] == 9
    assert world.status["pending"]["limits"]["maxConnections"] == 19  # (60 - 3) / 3
    assert world.status["pending"]["notBefore"] == resource.format_time(1_012.0)
    assert "change to 19 per replica pending until" in world.conditions()["Ready"]["message"]
    check_status_schema(world.status)
    world.now += 10
    await world.round()
    assert {p: world.delivery.held[p] for p in "abc"} == dict.fromkeys("abc", 19)
    assert "pending" not in world.status and world.status["fleetConnections"] == 60
    assert world.status["offered"]["maxConnections"] == 19  # written before the raise


async def test_budget_below_minimum_is_degraded(world: World) -> None:
    world.fetchpool({**SPEC, "connectionBudget": 50, "minPerReplica": 10})
    world.deployment(6)
    world.hpa(6, 6, max_replicas=6)
    await world.round()
    conds = world.conditions()
    assert conds["Degraded"]["status"] == "True" and conds["Degraded"]["reason"] == "BudgetBelowMinimum"
    assert conds["Degraded"]["message"] == (
        "connection budget 50 is below minPerReplica 10 x 6 pods (ceiling 6 plus terminating pods) = 60: "
        "the fleet may open 60 connections"
    )
    assert world.status["limits"]["maxConnections"] == 10


@pytest.mark.parametrize(
    ("spec", "reason", "message"),
    [
        (
            {"connectionBudget": 60},
            "InvalidSpec",
            "spec.target.name is missing: name the Deployment whose replicas divide the budget",
        ),
        (
            {**SPEC, "connectionBudget": -1, "minPerReplica": -2},
            "InvalidSpec",
            "spec.connectionBudget must be >= 1 connection, got -1; spec.minPerReplica must be >= 1 connection, got -2",
        ),
        (
            {**SPEC, "target": {"name": "nope"}},
            "TargetNotFound",
            "Deployment default/nope (spec.target.name) not found",
        ),
    ],
)
async def test_bad_input_keeps_the_last_good_limits(
    world: World, spec: dict[str, Any], reason: str, message: str
) -> None:
    world.fetchpool(SPEC)
    world.deployment(2)
    world.hpa(2, 2, max_replicas=2)
    world.pod("a")
    world.pod("b")
    await world.round()  # last good: 30 per replica
    world.fetchpool(spec, status=world.status)
    world.hpa(8, 8)  # a change that would shrink the pods
    world.now += 1
    await world.round()
    assert [k for k, _ in world.log] == ["status"]  # no push, no ConfigMap write
    assert world.cm_limits() == START and world.delivery.held == {"a": 30, "b": 30}
    conds = world.conditions()
    assert conds["Degraded"] == {**conds["Degraded"], "status": "True", "reason": reason, "message": message}
    assert conds["Ready"]["status"] == "False"
    assert conds["Ready"]["message"] == message + "; pods keep their last good limits (30 per replica)"
    assert world.status["limits"]["maxConnections"] == 30
    check_status_schema(world.status)


async def test_a_named_hpa_that_is_missing_is_reported_and_the_deployment_divides(world: World) -> None:
    world.fetchpool({**SPEC, "target": {"name": "web", "hpaName": "other"}})
    world.deployment(2)
    world.hpa(2, 2)  # not the one named
    world.pod("a")
    world.pod("b")
    await world.round()
    assert world.delivery.held == {"a": 30, "b": 30}  # the Deployment's 2 replicas, no surge
    conds = world.conditions()
    assert conds["Degraded"]["reason"] == "HPANotFound"
    assert conds["Degraded"]["message"].startswith(
        "HorizontalPodAutoscaler default/other (spec.target.hpaName) not found"
    )


async def test_a_second_fetchpool_on_the_same_deployment_is_refused(world: World) -> None:
    world.fetchpool(SPEC, created="2026-01-01T00:00:00Z")
    world.fetchpool({**SPEC, "connectionBudget": 500}, name="late", created="2026-02-01T00:00:00Z")
    world.deployment(2)
    world.hpa(2, 2, max_replicas=2)
    world.pod("a")
    world.pod("b")
    await world.round()
    world.log.clear()
    await world.reconciler.reconcile(NS, "late")
    assert [k for k, _ in world.log] == ["status"]  # it pushes nothing and writes no ConfigMap
    late = world.kmock.objects[FP, NS, "late"].raw["status"]
    conds = {c["type"]: c for c in late["conditions"]}
    assert conds["Conflict"]["status"] == "True" and conds["Conflict"]["reason"] == "TargetClaimed"
    assert conds["Conflict"]["message"] == (
        "FetchPool default/pool (created first) already divides the budget of Deployment web"
    )
    assert conds["Ready"]["status"] == "False" and conds["Degraded"]["reason"] == "Conflict"
    assert world.delivery.held == {"a": 30, "b": 30}
    check_status_schema(late)
    # The first one is deleted: the later one takes over.
    world.kmock.objects[FP, NS, "pool"].delete()
    world.now += 1
    await world.reconciler.reconcile(NS, "late")
    assert world.delivery.held == {"a": 250, "b": 250}
    assert world.kmock.objects[FP, NS, "late"].raw["status"]["conditions"][2]["status"] == "False"


async def test_an_unreachable_pod_is_reported_counted_high_and_retried(world: World) -> None:
    world.fetchpool(SPEC)
    world.deployment(3)
    world.hpa(3, 3, max_replicas=3)
    for name in "abc":
        world.pod(name)
    world.delivery.fail = {"b"}
    await world.round()
    # b was never confirmed and never raised by anyone (status.offered is empty): it counts at the
    # start limit, 1; a and c get their share, 60 / 3 = 20, and b the rest once it answers.
    assert world.delivery.held == {"a": 20, "b": 1, "c": 20}
    status = world.status
    assert status["delivery"]["confirmed"] == 2
    [unreachable] = status["delivery"]["unreachable"]
    assert unreachable["pod"] == "b" and unreachable["error"].startswith("DEADLINE_EXCEEDED")
    conds = world.conditions()
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "PodsUnreachable"
    assert conds["Degraded"]["reason"] == "PodsUnreachable"
    assert conds["Degraded"]["message"].startswith("1 of 3 ready pods did not take the limits, retrying every 60s")
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
    world.hpa(2, 2, max_replicas=2)
    world.pod("a")
    world.pod("b")
    world.pod("stranger", labels={"app": "other"})  # kmock ignores the selector; KubeIO filters again
    await world.round()
    assert world.status["replicas"]["pods"] == 2
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
    # mean demand 5 requests in flight + queued -> 5 * (1 + 0.3 / 0.1) = 20 per replica (<= the share)
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
