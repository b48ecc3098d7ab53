"""The fleet's budget at every moment, proved over random histories (hypothesis, stateful).

The real :class:`~fetchpool.operator.reconciler.Reconciler` runs against a model of the cluster held in
memory: every API call and every exchange with a pod waits at a gate, and hypothesis decides what
happens between two of them - the HPA deciding, the Deployment controller creating or terminating
pods, pods starting (from the limits file as it is at that moment), becoming ready, restarting, going
away, becoming unreachable (answering nothing, or applying a change but losing the answer), the
kubelet projecting a new ConfigMap into a pod, the budget changing, the operator crashing in the
middle of a round (its memory is lost) and starting again, the clock moving. (No Kubernetes API
server runs here; this model replaces it and the pods so that hypothesis can interleave everything.)

After every step, with ``S`` = ``minPerReplica`` (the start limit), ``C`` the ceiling (HPA
``maxReplicas`` or the Deployment's replicas, plus ``maxSurge``) and ``T`` the terminating pods::

    sum over live pods of their max_connections
        <= max(allowed budget, S x (C + T))                      # S x (C + T): minPerReplica forces it
           + S x (pods beyond the ceiling the last completed round accounted for)

where the allowed budget is the spec's, except that after a decrease the previous one stays allowed
until a round started after the decrease has completed with the fleet counted within the new one
(the operator cannot lower a pod it cannot reach: it reports that). The last term is the rule's
stated limit: a pod that replaces a still-terminating one, or one above a raised ceiling, before the
operator has seen it takes the start limit without a reserved slot.

Before any raise reaches a pod, ``status.offered`` already covers it (an operator started later
counts a pod it cannot reach at that). At the end of every round: the operator's count
(``status.fleetConnections``) is at least what the pods hold (it never undercounts), and a count
over the budget is reported as ``Degraded``, for a cause: ``BudgetBelowMinimum`` when the minimum
alone exceeds it, ``OverBudget`` only while some pod does not answer or still drains. And growth is
never blocked for good: once the cluster is quiet, a few rounds bring every reachable ready pod to
the per-replica limit, or the count leaves no room for one more connection each.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from fetchpool.operator import resource
from fetchpool.operator.delivery import PodOutcome, PodPlan, PodTarget, PoolExtras
from fetchpool.operator.health import Health
from fetchpool.operator.policy import DEFAULT_POOL, Limits
from fetchpool.operator.reconciler import Reconciler
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

NS, NAME = "default", "pool"


@dataclass
class Pod:
    name: str
    started: bool = False
    ready: bool = False
    terminating: bool = False
    restarts: int = 0
    limits: Limits | None = None  # None until the process runs
    given: Limits | None = None  # what the limits file gave it (the server's watcher compares)
    mode: str = "ok"  # ok | down (answers nothing) | lossy (applies, but the answer is lost)

    def holds(self) -> int:
        return self.limits.max_connections if self.started and self.limits is not None else 0


@dataclass
class World:
    """The cluster: one FetchPool, one Deployment, maybe an HPA, the pods and the limits ConfigMap."""

    budget: int
    min_per: int
    hpa_max: int | None  # None: nothing scales the Deployment but kubectl
    surge: Any
    stabilization: float
    replicas: int
    desired: int
    now: float = 1_000_000.0
    generation: int = 1
    status: dict[str, Any] = field(default_factory=dict)
    pods: dict[str, Pod] = field(default_factory=dict)
    cm: dict[str, Any] | None = None
    serial: int = 0
    waiting: list[tuple[str, asyncio.Future[None]]] = field(default_factory=list)

    def file_limits(self) -> Limits:
        """What a process starting now takes: the ConfigMap's, else the chart's env (minPerReplica)."""
        if self.cm is not None:
            data = json.loads(self.cm[resource.LIMITS_KEY])
            return Limits(
                max_connections=data["max_connections"], max_keepalive_connections=data["max_keepalive_connections"]
            )
        return Limits(max_connections=self.min_per, max_keepalive_connections=self.min_per // 2)

    def nonterminating(self) -> list[Pod]:
        return [p for p in self.pods.values() if not p.terminating]

    def ceiling(self) -> int:
        scaled = self.hpa_max if self.hpa_max is not None else self.replicas
        base = max(scaled, self.replicas, self.desired, len(self.nonterminating()), 1)
        return base + resource.max_surge_of(self.deployment(), base)

    def deployment(self) -> dict[str, Any]:
        strategy: dict[str, Any] = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": self.surge}}
        if self.surge == "recreate":
            strategy = {"type": "Recreate"}
        return {
            "metadata": {"name": "web", "namespace": NS},
            "spec": {"replicas": self.replicas, "selector": {"matchLabels": {"app": "web"}}, "strategy": strategy},
            "status": {"replicas": len(self.nonterminating())},
        }

    def fetchpool(self) -> dict[str, Any]:
        return {
            "metadata": {"name": NAME, "namespace": NS, "uid": "fp", "generation": self.generation},
            "spec": {
                "target": {"name": "web"},
                "connectionBudget": self.budget,
                "minPerReplica": self.min_per,
                "keepaliveShare": 0.5,
                "stabilizationSeconds": self.stabilization,
            },
            "status": copy.deepcopy(self.status),
        }

    def pod_object(self, pod: Pod) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": pod.name, "uid": f"uid-{pod.name}", "labels": {"app": "web"}}
        if pod.terminating:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        conditions = [{"type": "Ready", "status": "True" if pod.ready else "False"}]
        return {
            "metadata": meta,
            "spec": {"containers": [{"name": "fetchpool", "ports": [{"name": "grpc", "containerPort": 50051}]}]},
            "status": {
                "phase": "Running" if pod.started else "Pending",
                **({"podIP": "10.0.0.1"} if pod.started else {}),
                "conditions": conditions,
                "containerStatuses": [{"restartCount": pod.restarts}],
            },
        }

    async def gate(self, label: str) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append((label, future))
        await future


class ModelKube:
    """The API the reconciler uses (``KubeIO``'s methods), over the model; each call waits at a gate."""

    def __init__(self, world: World, machine: FleetMachine) -> None:
        self.world = world
        self.machine = machine

    async def get_fetchpool(self, namespace: str, name: str) -> dict[str, Any] | None:
        await self.world.gate("get fetchpool")
        self.machine.round_saw_budget = self.world.budget
        return self.world.fetchpool()

    async def list_fetchpools(self, namespace: str) -> list[dict[str, Any]]:
        return [self.world.fetchpool()]

    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        await self.world.gate("get deployment")
        return self.world.deployment()

    async def find_hpa(self, namespace: str, deployment: str, hpa_name: str | None) -> dict[str, Any] | None:
        if self.world.hpa_max is None:
            return None
        await self.world.gate("get hpa")
        w = self.world
        return {
            "metadata": {"name": "web"},
            "spec": {"maxReplicas": w.hpa_max, "scaleTargetRef": {"kind": "Deployment", "name": "web"}},
            "status": {"desiredReplicas": w.desired, "currentReplicas": w.replicas},
        }

    async def list_pods(self, namespace: str, selector: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        await self.world.gate("list pods")
        self.machine.round_saw_terminating = {p.name for p in self.world.pods.values() if p.terminating}
        return [self.world.pod_object(p) for p in self.world.pods.values()]

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        await self.world.gate("get configmap")
        return {"data": dict(self.world.cm)} if self.world.cm is not None else None

    async def write_configmap(self, namespace: str, name: str, data: Mapping[str, str], **_: Any) -> None:
        await self.world.gate("write configmap")
        self.world.cm = dict(data)

    async def patch_fetchpool_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self.world.gate("patch status")
        self.world.status = _merge(self.world.status, patch)


def _merge(old: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(old)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class ModelDelivery:
    """The pods' PoolAdmin: each exchange waits at its own gate, then acts on the pod as it is then."""

    def __init__(self, world: World) -> None:
        self.world = world

    async def push(self, plans: Sequence[PodPlan], extras: PoolExtras | None = None) -> list[PodOutcome]:
        return list(await asyncio.gather(*(self._one(plan) for plan in plans)))

    async def _one(self, plan: PodPlan) -> PodOutcome:
        name = plan.target.name
        await self.world.gate(f"push {name}")
        pod = self.world.pods.get(name)
        if pod is None or not pod.started or pod.limits is None or pod.mode == "down":
            return PodOutcome(name=name, address=plan.target.address, ok=False, error="UNAVAILABLE")
        want = plan.limits[DEFAULT_POOL]
        if plan.lower_only:
            conns = min(pod.limits.max_connections, want.max_connections)
            want = Limits(
                max_connections=conns,
                max_keepalive_connections=min(
                    pod.limits.max_keepalive_connections, want.max_keepalive_connections, conns
                ),
            )
        if want.max_connections > pod.limits.max_connections:  # a raise: it was written ahead in the status
            offered = resource.limits_from_status(self.world.status.get("offered")).get(DEFAULT_POOL)
            assert offered is not None and offered.max_connections >= want.max_connections, (want, self.world.status)
        pod.limits = want
        if pod.mode == "lossy":
            return PodOutcome(name=name, address=plan.target.address, ok=False, error="DEADLINE_EXCEEDED")
        return PodOutcome(name=name, address=plan.target.address, ok=True, in_force={"direct": want.max_connections})

    async def demand(self, pods: Sequence[PodTarget]) -> dict[str, dict[str, float]]:
        return {}


class FleetMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.world: World | None = None
        self.reconciler: Reconciler | None = None
        self.task: asyncio.Task[Any] | None = None
        self.allowed = 0
        self.accounted_ceiling = 0
        self.accounted_terminating: set[str] = set()
        self.round_saw_budget: int | None = None
        self.round_saw_terminating: set[str] = set()
        self.rounds_completed = 0
        self.flaky: set[str] = set()  # pods not answering at some time since the last round completed

    # --- set-up -------------------------------------------------------------------------------

    @initialize(
        hpa_max=st.one_of(st.none(), st.integers(1, 5)),
        surge=st.sampled_from([0, 1, "25%", "50%", "recreate"]),
        min_per=st.integers(1, 6),
        budget=st.integers(1, 120),
        stabilization=st.sampled_from([0.0, 0.0, 5.0]),
        replicas=st.integers(1, 4),
    )
    def install(
        self, hpa_max: int | None, surge: Any, min_per: int, budget: int, stabilization: float, replicas: int
    ) -> None:
        if hpa_max is not None:
            replicas = min(replicas, hpa_max)
        self.world = World(
            budget=budget,
            min_per=min_per,
            hpa_max=hpa_max,
            surge=surge,
            stabilization=stabilization,
            replicas=replicas,
            desired=replicas,
        )
        for _ in range(replicas):  # installed and running before the operator ever ran (chart's env: minPerReplica)
            pod = self._new_pod()
            self._start(pod)
            pod.ready = True
        self.allowed = budget
        self.accounted_ceiling = self.world.ceiling()
        self.operator_starts()
        self._finish_round()  # installed: the operator has divided the budget once

    def _new_pod(self) -> Pod:
        w = self.world
        assert w is not None
        w.serial += 1
        pod = Pod(name=f"web-{w.serial}")
        w.pods[pod.name] = pod
        return pod

    def _start(self, pod: Pod) -> None:
        assert self.world is not None
        pod.started = True
        pod.limits = pod.given = self.world.file_limits()

    # --- the cluster --------------------------------------------------------------------------

    @property
    def w(self) -> World:
        assert self.world is not None
        return self.world

    def _pick(self, data: st.DataObject, pods: list[Pod]) -> Pod:
        return data.draw(st.sampled_from(sorted(pods, key=lambda p: p.name)))

    @rule(n=st.integers(1, 6))
    def scaler_decides(self, n: int) -> None:
        """The HPA's status says n (within its bounds), or someone runs kubectl scale (no HPA)."""
        if self.w.hpa_max is not None:
            self.w.desired = min(n, self.w.hpa_max)
        else:
            self.w.replicas = self.w.desired = n

    @rule(n=st.integers(1, 6))
    def scale(self, n: int) -> None:
        """The scaler sets the Deployment's replicas and its controller creates (pending) or
        terminates pods to match, all at once."""
        self.scaler_decides(n)
        self.w.replicas = self.w.desired
        while self._controller_step():
            pass

    @rule()
    def deployment_controller(self) -> None:
        """One step of the Deployment's controller towards what the scaler decided."""
        self.w.replicas = self.w.desired
        self._controller_step()

    def _controller_step(self) -> bool:
        """Create or terminate one pod; it does not count terminating pods (Kubernetes' default)."""
        live = self.w.nonterminating()
        if len(live) < self.w.replicas:
            self._new_pod()
        elif len(live) > self.w.replicas:
            victim = sorted(live, key=lambda p: (p.ready, p.started, p.name))[0]
            victim.terminating = True
            victim.ready = False
        else:
            return False
        return True

    @precondition(lambda self: any(not p.started for p in self.w.pods.values()))
    @rule(data=st.data())
    def pod_starts(self, data: st.DataObject) -> None:
        self._start(self._pick(data, [p for p in self.w.pods.values() if not p.started]))

    @precondition(lambda self: any(p.started and not p.ready and not p.terminating for p in self.w.pods.values()))
    @rule(data=st.data())
    def pod_becomes_ready(self, data: st.DataObject) -> None:
        self._pick(
            data, [p for p in self.w.pods.values() if p.started and not p.ready and not p.terminating]
        ).ready = True

    @precondition(lambda self: any(p.terminating for p in self.w.pods.values()))
    @rule(data=st.data())
    def pod_gone(self, data: st.DataObject) -> None:
        del self.w.pods[self._pick(data, [p for p in self.w.pods.values() if p.terminating]).name]

    @precondition(lambda self: any(p.started for p in self.w.pods.values()))
    @rule(data=st.data())
    def container_restarts(self, data: st.DataObject) -> None:
        pod = self._pick(data, [p for p in self.w.pods.values() if p.started])
        pod.restarts += 1
        pod.ready = False
        self._start(pod)

    @precondition(lambda self: bool(self.w.pods))
    @rule(data=st.data(), mode=st.sampled_from(["ok", "ok", "down", "lossy"]))
    def pod_reachability(self, data: st.DataObject, mode: str) -> None:
        pod = self._pick(data, list(self.w.pods.values()))
        pod.mode = mode
        if mode != "ok":
            self.flaky.add(pod.name)

    @precondition(lambda self: self.w.cm is not None and any(p.started for p in self.w.pods.values()))
    @rule(data=st.data())
    def kubelet_projects_the_configmap(self, data: st.DataObject) -> None:
        """The pod's server sees a new limits file: it lowers pools still holding what the file gave."""
        pod = self._pick(data, [p for p in self.w.pods.values() if p.started])
        new = self.w.file_limits()
        if pod.limits == pod.given and pod.limits is not None:
            conns = min(new.max_connections, pod.limits.max_connections)
            pod.limits = Limits(
                max_connections=conns,
                max_keepalive_connections=min(new.max_keepalive_connections, pod.limits.max_keepalive_connections),
            )
        pod.given = new if pod.limits == pod.given else pod.given

    @rule(budget=st.integers(1, 120))
    def budget_changes(self, budget: int) -> None:
        if budget >= self.allowed:
            self.allowed = budget
        self.w.budget = budget
        self.w.generation += 1

    @rule(seconds=st.sampled_from([0.5, 3.0, 10.0]))
    def time_passes(self, seconds: float) -> None:
        self.w.now += seconds

    # --- the operator -------------------------------------------------------------------------

    def _run(self) -> None:
        """Let the operator's tasks run until each waits at a gate again (there is no real I/O)."""
        for _ in range(20):
            self.loop.run_until_complete(asyncio.sleep(0))
        if self.task is not None and self.task.done():
            self._round_done(self.task)
            self.task = None

    def _round_done(self, task: asyncio.Task[Any]) -> None:
        task.result()  # a round never fails against this model
        self.rounds_completed += 1
        if currently_in_test_context():
            event(f"rounds completed: {min(self.rounds_completed, 5)}+")
        status = self.w.status
        fleet = status.get("fleetConnections")
        assert fleet is not None, status
        held = sum(p.holds() for p in self.w.pods.values())
        unseen = {p.name for p in self.w.pods.values() if p.terminating} - self.round_saw_terminating
        assert held <= fleet + self.w.min_per * len(unseen) + self._beyond(status.get("ceiling", 0)), (
            "the operator undercounts",
            held,
            status,
        )
        degraded = {c["type"]: c for c in status.get("conditions", [])}["Degraded"]
        seen_budget = self.round_saw_budget
        assert seen_budget is not None
        if fleet > seen_budget:  # never silently, and only for a cause: the minimum, or a pod that did not answer
            floor = self.w.min_per * (status["ceiling"] + len(self.round_saw_terminating))
            if floor > seen_budget:
                assert degraded["reason"] == "BudgetBelowMinimum", status
            else:  # pods hold more than the operator can take back now: silent ones, or draining ones
                assert degraded["reason"] == "OverBudget", status
                causes = (self.flaky & set(self.w.pods)) | self.round_saw_terminating
                assert causes, ("over budget with every pod answering and none draining", held, status)
        if seen_budget == self.w.budget:
            self.allowed = max(self.w.budget, fleet)
        else:  # the budget changed during the round: a decrease is not enforced yet
            self.allowed = max(self.allowed, self.w.budget, fleet)
        self.accounted_ceiling = status.get("ceiling", 0)
        self.accounted_terminating = set(self.round_saw_terminating)
        self.flaky = {p.name for p in self.w.pods.values() if p.mode != "ok"}

    def _beyond(self, ceiling: int) -> int:
        return self.w.min_per * max(0, len(self.w.nonterminating()) - ceiling)

    @rule()
    def operator_starts(self) -> None:
        if self.reconciler is None:
            self.reconciler = Reconciler(
                ModelKube(self.w, self),
                ModelDelivery(self.w),
                Health(),  # type: ignore[arg-type]
                retry_seconds=3600,
                clock=lambda: self.w.now,
            )

    @precondition(lambda self: self.reconciler is not None)
    @rule(data=st.data(), full=st.booleans())
    def operator_step(self, data: st.DataObject, full: bool) -> None:
        """The operator goes on: one waiting call or exchange completes (hypothesis picks which)."""
        assert self.reconciler is not None
        if self.task is None:
            self.task = self.loop.create_task(self.reconciler.reconcile(NS, NAME, full=full))
        elif self.w.waiting:
            index = data.draw(st.integers(0, len(self.w.waiting) - 1))
            _, future = self.w.waiting.pop(index)
            future.set_result(None)
        self._run()

    @precondition(lambda self: self.reconciler is not None)
    @rule(full=st.booleans())
    def operator_round(self, full: bool) -> None:
        """The operator finishes its round, or runs a whole one, with nothing happening meanwhile."""
        self._finish_round(full=full)

    def _finish_round(self, *, full: bool = False) -> None:
        assert self.reconciler is not None
        if self.task is None:
            self.task = self.loop.create_task(self.reconciler.reconcile(NS, NAME, full=full))
        while self.task is not None:
            for _, future in self.w.waiting:
                future.set_result(None)
            self.w.waiting.clear()
            self._run()

    @precondition(lambda self: self.reconciler is not None)
    @rule()
    def operator_crashes(self) -> None:
        """The operator dies wherever it is; what it knew of the pods dies with it."""
        assert self.reconciler is not None
        if self.task is not None:
            self.task.cancel()
            self.w.waiting.clear()
            self.loop.run_until_complete(asyncio.gather(self.task, return_exceptions=True))
            self.task = None
        self.loop.run_until_complete(self.reconciler.close())
        self.reconciler = None

    @precondition(lambda self: self.reconciler is not None and self.task is None)
    @rule()
    def quiet_cluster_settles(self) -> None:
        """No change for a while: a few undisturbed rounds leave no reachable ready pod below where
        the budget lets it go (growth is never blocked for good by a pod that does not answer)."""
        for _ in range(4):
            self.w.now += self.w.stabilization + 1
            self._finish_round()
        status = self.w.status
        target = status["limits"]["maxConnections"]
        reachable = [p for p in self.w.pods.values() if p.ready and p.mode == "ok" and not p.terminating]
        below = [p for p in reachable if p.holds() < target]
        room = self.w.budget - status["fleetConnections"]
        assert not below or room < len(below), ("growth blocked", target, room, [(p.name, p.holds()) for p in below])

    # --- the invariant ------------------------------------------------------------------------

    @invariant()
    def within_budget(self) -> None:
        if self.world is None:
            return
        w = self.w
        held = sum(p.holds() for p in w.pods.values())
        terminating = [p for p in w.pods.values() if p.terminating]
        unaccounted = {p.name for p in terminating} - self.accounted_terminating
        bound = max(self.allowed, w.min_per * (w.ceiling() + len(terminating)))
        bound += w.min_per * len(unaccounted) + self._beyond(self.accounted_ceiling)
        assert held <= bound, {
            "held": held,
            "bound": bound,
            "allowed": self.allowed,
            "pods": {p.name: (p.holds(), p.started, p.ready, p.terminating, p.mode) for p in w.pods.values()},
            "status": w.status,
        }

    def teardown(self) -> None:
        if self.reconciler is not None:
            if self.task is not None:
                self.task.cancel()
                self.loop.run_until_complete(asyncio.gather(self.task, return_exceptions=True))
            self.loop.run_until_complete(self.reconciler.close())
        self.loop.close()


TestFleetBudget = FleetMachine.TestCase
TestFleetBudget.settings = settings(
    max_examples=int(__import__("os").environ.get("FETCHPOOL_MODEL_EXAMPLES", "200")),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _machine(**install: Any) -> FleetMachine:
    machine = FleetMachine()
    machine.install(**{"surge": "25%", "stabilization": 0.0, **install})
    return machine


def _start_everything(machine: FleetMachine, *, ready: bool = True) -> None:
    for pod in machine.w.pods.values():
        if not pod.started:
            machine._start(pod)
        pod.ready = ready and not pod.terminating
        machine.within_budget()


def test_a_scale_up_while_the_operator_is_down_stays_within_the_budget() -> None:
    """The example of the issue: 2 pods at their share, the operator stops, the HPA doubles the fleet."""
    m = _machine(hpa_max=4, min_per=2, budget=100, replicas=2)  # ceiling 4 + 1 (maxSurge 25 %)
    try:
        # 100 - 3 pods the scaler may still add x 2 = 94, shared by 2 ready pods.
        assert [p.holds() for p in m.w.pods.values()] == [47, 47]
        m.operator_crashes()
        m.scale(4)
        _start_everything(m)  # they start from the ConfigMap: 2 each
        assert sorted(p.holds() for p in m.w.pods.values()) == [2, 2, 47, 47]  # 98 <= 100
        m.operator_starts()
        m._finish_round()  # lowers the two, then raises the new ones: (100 - 1 x 2) / 4 = 24
        assert sorted(p.holds() for p in m.w.pods.values()) == [24, 24, 24, 24]
        assert m.w.status["fleetConnections"] == 98 and m.w.status["ceiling"] == 5
    finally:
        m.teardown()


def test_an_unreachable_pod_counts_at_its_larger_limit_and_others_still_grow() -> None:
    m = _machine(hpa_max=3, min_per=1, budget=60, replicas=2, surge=0)
    try:
        assert [p.holds() for p in m.w.pods.values()] == [29, 29]  # (60 - 1 kept for a third pod) / 2
        m.w.pods["web-1"].mode = "down"
        m.scale(3)
        _start_everything(m)
        m._finish_round()
        # The share is 20 now. web-1 cannot be lowered: it counts at 29, and web-3 grows into what is
        # left (60 - 29 - 20 = 11) instead of waiting for web-1.
        assert {n: p.holds() for n, p in m.w.pods.items()} == {"web-1": 29, "web-2": 20, "web-3": 11}
        status = m.w.status
        assert [u["pod"] for u in status["delivery"]["unreachable"]] == ["web-1"]
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Degraded"]["reason"] == "PodsUnreachable" and conditions["Ready"]["status"] == "False"
        assert status["limitSum"] == 60 and status["fleetConnections"] == 60
        m._finish_round()  # web-1 is known to be silent now: the other two share what it leaves
        assert {n: p.holds() for n, p in m.w.pods.items()} == {"web-1": 29, "web-2": 15, "web-3": 15}
        m.w.pods["web-1"].mode = "ok"
        m._finish_round()  # it answers: lowered to the share of that round ...
        m._finish_round()  # ... and all three share the budget
        assert [p.holds() for p in m.w.pods.values()] == [20, 20, 20]
        assert {c["type"]: c["status"] for c in m.w.status["conditions"]}["Ready"] == "True"
    finally:
        m.teardown()
