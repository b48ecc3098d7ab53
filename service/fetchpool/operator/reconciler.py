"""One reconciliation round for a ``FetchPool``: observe, decide, deliver, record.

Level-triggered: every round reads the FetchPool, its Deployment, the HPA and the pods afresh,
computes the limits with :func:`fetchpool.operator.policy.decide` from what it observed plus what
the previous round recorded in ``FetchPool.status``, and converges the world on the result. It does
not matter which event triggered it, or how many events arrived meanwhile: triggers for one
FetchPool are coalesced (one round runs, at most one more is queued) and the queued round sees the
newest state.

Order of writes in a round (never over budget in between):

1. the limits ConfigMap gets ``min(old, new)`` - so a pod starting now starts within the new budget;
2. every ready pod whose confirmed limits differ gets the new ones (concurrently, per-pod deadline);
3. the ConfigMap gets ``new`` (only differs from step 1 when the limits grew);
4. the status records holders, limits in force, ``appliedAt``, pending changes, unreachable pods
   and the ``Ready`` / ``Degraded`` conditions (patched only when something changed).

Bad input (invalid spec, missing Deployment, no HPA) stops the round before step 1: the pods and the
ConfigMap keep their last good limits and the conditions say exactly what is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fetchpool.operator import resource
from fetchpool.operator.delivery import Delivery, PodOutcome, PodTarget, PoolExtras
from fetchpool.operator.health import Health
from fetchpool.operator.k8s import KubeIO
from fetchpool.operator.policy import (
    BUDGET_BELOW_MINIMUM,
    DEFAULT_POOL,
    FORMULA_INPUTS_UNAVAILABLE,
    Decision,
    FleetObservation,
    Mode,
    Problem,
    decide,
)

__all__ = ["Reconciler", "RoundResult", "merge_patch"]

log = logging.getLogger(__name__)

PODS_UNREACHABLE = "PodsUnreachable"
INVALID_SPEC = "InvalidSpec"
TARGET_NOT_FOUND = "TargetNotFound"
HPA_NOT_FOUND = "HPANotFound"
LIMITS_APPLIED = "LimitsApplied"

#: Degraded reasons, most important first (the condition shows the first; the message lists all).
_SEVERITY = [
    INVALID_SPEC,
    TARGET_NOT_FOUND,
    HPA_NOT_FOUND,
    BUDGET_BELOW_MINIMUM,
    PODS_UNREACHABLE,
    FORMULA_INPUTS_UNAVAILABLE,
]

Key = tuple[str, str]


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    """What one round did (for logs and tests)."""

    decision: Decision | None
    outcomes: tuple[PodOutcome, ...] = ()
    problem: Problem | None = None
    status_written: bool = False


@dataclass
class _KeyState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    queued: bool = False
    full: bool = False
    timer: asyncio.Task[None] | None = None
    timer_due: float = 0.0


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Reconciler:
    """Runs rounds; one instance per operator process."""

    def __init__(
        self,
        kube: KubeIO,
        delivery: Delivery,
        health: Health | None = None,
        *,
        retry_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.delivery = delivery
        self.health = health or Health()
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._keys: dict[Key, _KeyState] = {}
        #: pod uid -> (address, restarts, limits fingerprint) the pod confirmed.
        self._confirmed: dict[str, tuple[str, int, str]] = {}

    # --- triggering -------------------------------------------------------------------------

    async def trigger(self, namespace: str, name: str, *, reason: str = "", full: bool = False) -> None:
        """Run a round for ``namespace/name`` now, or make sure one runs after the current one.

        ``full`` re-delivers to every ready pod even when it confirmed the limits before (the timer
        uses it to correct pods changed behind the operator's back). Never raises.
        """
        state = self._keys.setdefault((namespace, name), _KeyState())
        state.full = state.full or full
        if state.queued:
            return  # a round is already waiting; it will observe the newest state
        state.queued = True
        async with state.lock:
            state.queued = False
            full, state.full = state.full, False
            log.debug("reconcile %s/%s (%s%s)", namespace, name, reason, ", full" if full else "")
            started = time.monotonic()
            try:
                await self.reconcile(namespace, name, full=full)
            except Exception as exc:  # level-triggered: the next trigger or the timer retries
                self.health.reconcile_errors_total += 1
                log.warning("reconcile %s/%s failed: %s", namespace, name, exc, exc_info=True)
                self.schedule(namespace, name, self.retry_seconds, reason="retry after error")
            finally:
                self.health.reconciles_total += 1
                self.health.last_reconcile_duration = time.monotonic() - started

    def schedule(self, namespace: str, name: str, delay: float, *, reason: str = "scheduled") -> None:
        """Trigger a round after ``delay`` seconds (the earliest of several schedules wins)."""
        state = self._keys.setdefault((namespace, name), _KeyState())
        due = time.monotonic() + max(0.0, delay)
        if state.timer is not None and not state.timer.done():
            if state.timer_due <= due:
                return
            state.timer.cancel()

        async def later() -> None:
            await asyncio.sleep(max(0.0, delay))
            state.timer = None
            await self.trigger(namespace, name, reason=reason)

        state.timer_due = due
        state.timer = asyncio.get_running_loop().create_task(later(), name=f"fetchpool-reconcile-{namespace}/{name}")

    async def close(self) -> None:
        """Cancel scheduled rounds."""
        for state in self._keys.values():
            if state.timer is not None:
                state.timer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await state.timer

    # --- one round --------------------------------------------------------------------------

    async def reconcile(self, namespace: str, name: str, *, full: bool = False) -> RoundResult:
        """One round (see the module docstring). Raises on API errors."""
        fetchpool = await self.kube.get_fetchpool(namespace, name)
        if fetchpool is None:
            self._keys.pop((namespace, name), None)
            return RoundResult(decision=None)
        now = self._clock()
        meta = fetchpool.get("metadata") or {}
        generation = meta.get("generation")
        status: Mapping[str, Any] = fetchpool.get("status") or {}

        spec, problems = resource.parse_spec(name, fetchpool.get("spec"))
        if spec is None:
            return await self._refuse(fetchpool, Problem(reason=INVALID_SPEC, message="; ".join(problems)), now)
        deployment = await self.kube.get_deployment(namespace, spec.deployment)
        if deployment is None:
            return await self._refuse(
                fetchpool,
                Problem(
                    reason=TARGET_NOT_FOUND,
                    message=f"Deployment {namespace}/{spec.deployment} (spec.target.name) not found",
                ),
                now,
            )
        hpa = await self.kube.find_hpa(namespace, spec.deployment, spec.hpa_name)
        if hpa is None:
            message = (
                f"HorizontalPodAutoscaler {namespace}/{spec.hpa_name} (spec.target.hpaName) not found"
                if spec.hpa_name
                else f"no HorizontalPodAutoscaler in namespace {namespace} has scaleTargetRef "
                f"Deployment/{spec.deployment}"
            )
            return await self._refuse(fetchpool, Problem(reason=HPA_NOT_FOUND, message=message), now)

        selector = (deployment.get("spec") or {}).get("selector")
        pods = [resource.pod_view(p, spec.grpc_port) for p in await self.kube.list_pods(namespace, selector)]
        live = [p for p in pods if p.live]
        ready = [p for p in live if p.ready and p.address]
        targets = [PodTarget(name=p.name, address=p.address or "") for p in ready]

        demand: dict[str, float] = {}
        if spec.sizing.mode is Mode.FORMULA and (
            spec.sizing.formula is None or spec.sizing.formula.concurrency is None
        ):
            demand = self._mean_demand(await self.delivery.demand(targets), spec.sizing.budgets())

        hpa_status = hpa.get("status") or {}
        observed = FleetObservation(
            hpa_current=_int(hpa_status.get("currentReplicas")),
            hpa_desired=_int(hpa_status.get("desiredReplicas")),
            deployment_replicas=_int((deployment.get("spec") or {}).get("replicas")),
            deployment_status_replicas=_int((deployment.get("status") or {}).get("replicas")),
            live_pods=len(live),
            demand_per_replica=demand,
        )
        in_force = resource.in_force_from_status(status, generation)
        decision = decide(spec.sizing, observed, in_force, now=now)

        # 1-3: ConfigMap (min of old and new), pods, ConfigMap (new).
        extras = PoolExtras(
            keepalive_expiry_seconds=spec.keepalive_expiry_seconds,
            pool_timeout_seconds=spec.pool_timeout_seconds,
        )
        new_file = resource.limits_file(
            decision.limits,
            keepalive_expiry_seconds=spec.keepalive_expiry_seconds,
            pool_timeout_seconds=spec.pool_timeout_seconds,
        )
        cm = await self.kube.get_configmap(namespace, spec.config_map)
        old_file = self._read_limits_file(cm)
        first_file = dict(new_file)
        if old_file is not None:
            for key in ("max_connections", "max_keepalive_connections"):
                if isinstance(old_file.get(key), int):
                    first_file[key] = min(int(old_file[key]), int(new_file[key]))
        pools_json = resource.dumps(resource.limits_to_status(decision.limits))
        owner = {
            "apiVersion": f"{resource.GROUP}/{resource.VERSION}",
            "kind": resource.KIND,
            "name": name,
            "uid": meta.get("uid", ""),
            "controller": True,
            "blockOwnerDeletion": False,
        }
        written = old_file
        if old_file != first_file:
            await self._write_cm(namespace, spec.config_map, first_file, pools_json, owner)
            written = first_file

        fingerprint = resource.dumps(
            {
                "limits": resource.limits_to_status(decision.limits),
                "extras": [extras.keepalive_expiry_seconds, extras.pool_timeout_seconds],
            }
        )
        to_push = [
            t
            for t, p in zip(targets, ready, strict=True)
            if full or self._confirmed.get(p.uid) != (p.address, p.restarts, fingerprint)
        ]
        outcomes = await self.delivery.push(to_push, decision.limits, extras) if to_push else []
        by_name = {p.name: p for p in ready}
        for outcome in outcomes:
            pod = by_name[outcome.name]
            if outcome.ok:
                self._confirmed[pod.uid] = (pod.address or "", pod.restarts, fingerprint)
            else:
                self._confirmed.pop(pod.uid, None)
                self.health.delivery_failures_total += 1
                log.warning(
                    "pod %s/%s (%s) did not take limits: %s",
                    namespace,
                    outcome.name,
                    outcome.address,
                    outcome.error,
                )
        alive = {p.uid for p in pods}
        for uid in [u for u in self._confirmed if u not in alive]:
            del self._confirmed[uid]

        if written != new_file:
            await self._write_cm(namespace, spec.config_map, new_file, pools_json, owner)

        # 4: status.
        failed = [o for o in outcomes if not o.ok]
        previous_unreachable = {
            u.get("pod"): u for u in (status.get("delivery") or {}).get("unreachable") or [] if isinstance(u, Mapping)
        }
        unreachable = [
            {
                "pod": o.name,
                "address": o.address,
                "error": o.error or "",
                "since": (previous_unreachable.get(o.name) or {}).get("since") or resource.format_time(now),
            }
            for o in sorted(failed, key=lambda o: o.name)
        ]
        problems_found = list(decision.problems)
        if unreachable:
            names = ", ".join(f"{u['pod']} ({u['address']}): {u['error']}" for u in unreachable)
            problems_found.append(
                Problem(
                    reason=PODS_UNREACHABLE,
                    message=f"{len(unreachable)} of {len(ready)} ready pods did not take the limits, "
                    f"retrying every {self.retry_seconds:g}s: {names}",
                )
            )
        limits_changed = dict(decision.limits) != dict(in_force.limits)
        applied_at = resource.format_time(now) if limits_changed or not status.get("appliedAt") else status["appliedAt"]
        new_status = self._status(
            fetchpool,
            spec_budget=spec.sizing.connection_budget,
            decision=decision,
            hpa=hpa,
            observed=observed,
            ready=len(ready),
            terminating=sum(1 for p in live if p.terminating),
            confirmed=sum(1 for p in ready if self._confirmed.get(p.uid) == (p.address, p.restarts, fingerprint)),
            unreachable=unreachable,
            applied_at=applied_at,
            problems=problems_found,
            now=now,
            config_map=spec.config_map,
            stabilization=spec.sizing.stabilization_seconds,
            extras=extras,
        )
        status_written = await self._patch_status(fetchpool, new_status)

        if failed:
            self.schedule(namespace, name, self.retry_seconds, reason="retry unreachable pods")
        elif decision.pending is not None:
            wait = decision.pending.since + spec.sizing.stabilization_seconds - now
            self.schedule(namespace, name, max(0.0, wait) + 0.05, reason="pending change due")
        if limits_changed:
            log.info(
                "%s/%s: %s per replica x %d holders (budget %d)",
                namespace,
                name,
                decision.limits[DEFAULT_POOL].max_connections,
                decision.holders,
                spec.sizing.connection_budget,
            )
        return RoundResult(decision=decision, outcomes=tuple(outcomes), status_written=status_written)

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _mean_demand(per_pod: Mapping[str, Mapping[str, float]], budgets: Mapping[str, int]) -> dict[str, float]:
        """Pool -> mean demand per replica; the default pool takes the busiest pool without a budget."""
        if not per_pod:
            return {}
        pools = {pool for pod in per_pod.values() for pool in pod}
        means = {pool: sum(pod.get(pool, 0.0) for pod in per_pod.values()) / len(per_pod) for pool in pools}
        out = {pool: value for pool, value in means.items() if pool in budgets}
        rest = [value for pool, value in means.items() if pool not in budgets]
        out[DEFAULT_POOL] = max(rest) if rest else 0.0
        return out

    @staticmethod
    def _read_limits_file(cm: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if not cm:
            return None
        raw = (cm.get("data") or {}).get(resource.LIMITS_KEY)
        try:
            loaded = json.loads(raw) if raw else None
        except ValueError:
            return None
        return loaded if isinstance(loaded, dict) else None

    async def _write_cm(
        self, namespace: str, name: str, limits: Mapping[str, Any], pools_json: str, owner: Mapping[str, Any]
    ) -> None:
        await self.kube.write_configmap(
            namespace,
            name,
            {resource.LIMITS_KEY: resource.dumps(limits), resource.POOLS_KEY: pools_json},
            owner=owner,
            labels={"app.kubernetes.io/managed-by": "fetchpool-operator"},
        )

    def _status(
        self,
        fetchpool: Mapping[str, Any],
        *,
        spec_budget: int,
        decision: Decision,
        hpa: Mapping[str, Any],
        observed: FleetObservation,
        ready: int,
        terminating: int,
        confirmed: int,
        unreachable: list[dict[str, Any]],
        applied_at: str,
        problems: list[Problem],
        now: float,
        config_map: str,
        stabilization: float,
        extras: PoolExtras,
    ) -> dict[str, Any]:
        generation = (fetchpool.get("metadata") or {}).get("generation")
        default = decision.limits[DEFAULT_POOL]
        limits: dict[str, Any] = resource.limits_to_status(decision.limits)
        if extras.keepalive_expiry_seconds is not None:
            limits["keepaliveExpirySeconds"] = extras.keepalive_expiry_seconds
        if extras.pool_timeout_seconds is not None:
            limits["poolTimeoutSeconds"] = extras.pool_timeout_seconds
        pending: dict[str, Any] | None = None
        if decision.pending is not None:
            pending = {
                "limits": resource.limits_to_status(decision.pending.limits),
                "since": resource.format_time(decision.pending.since),
                "notBefore": resource.format_time(decision.pending.since + stabilization),
            }
        ready_message = (
            f"{default.max_connections} connections per replica x {decision.holders} replicas = "
            f"{decision.fleet_connections()} (budget {spec_budget}); "
            f"{confirmed} of {ready} ready pods confirmed"
        )
        if decision.pending is not None:
            goal = decision.pending.limits[DEFAULT_POOL].max_connections
            ready_message += f"; change to {goal} per replica pending until {pending['notBefore']}"  # type: ignore[index]
        conditions = [
            resource.Condition(
                type="Ready",
                status=not unreachable,
                reason=LIMITS_APPLIED if not unreachable else PODS_UNREACHABLE,
                message=ready_message,
            ),
            self._degraded(problems),
        ]
        return {
            "observedGeneration": generation,
            "observedReplicas": decision.holders,
            "replicas": {
                "current": observed.hpa_current,
                "desired": observed.hpa_desired,
                "deployment": observed.deployment_replicas,
                "pods": observed.live_pods,
                "ready": ready,
                "terminating": terminating,
                "holders": decision.holders,
            },
            "hpa": (hpa.get("metadata") or {}).get("name"),
            "limits": limits,
            "fleetConnections": decision.fleet_connections(),
            "appliedAt": applied_at,
            "pending": pending,
            "configMap": config_map,
            "delivery": {"ready": ready, "confirmed": confirmed, "unreachable": unreachable},
            "conditions": resource.conditions_patch(
                (fetchpool.get("status") or {}).get("conditions"), conditions, now=now, generation=generation
            ),
        }

    @staticmethod
    def _degraded(problems: list[Problem]) -> resource.Condition:
        if not problems:
            return resource.Condition(type="Degraded", status=False, reason="AsExpected", message="")
        ordered = sorted(problems, key=lambda p: _SEVERITY.index(p.reason) if p.reason in _SEVERITY else 99)
        return resource.Condition(
            type="Degraded",
            status=True,
            reason=ordered[0].reason,
            message="; ".join(p.message for p in ordered),
        )

    async def _refuse(self, fetchpool: Mapping[str, Any], problem: Problem, now: float) -> RoundResult:
        """Bad input: keep the last good limits everywhere, say exactly what is wrong."""
        meta = fetchpool.get("metadata") or {}
        generation = meta.get("generation")
        status = fetchpool.get("status") or {}
        kept = resource.limits_from_status(status.get("limits"))
        kept_note = (
            f"; pods keep their last good limits ({kept[DEFAULT_POOL].max_connections} per replica)"
            if DEFAULT_POOL in kept
            else "; no limits were applied yet"
        )
        conditions = [
            resource.Condition(type="Ready", status=False, reason=problem.reason, message=problem.message + kept_note),
            resource.Condition(type="Degraded", status=True, reason=problem.reason, message=problem.message),
        ]
        new_status = {
            "observedGeneration": generation,
            "conditions": resource.conditions_patch(
                status.get("conditions"), conditions, now=now, generation=generation
            ),
        }
        log.warning("%s/%s: %s: %s", meta.get("namespace"), meta.get("name"), problem.reason, problem.message)
        written = await self._patch_status(fetchpool, new_status)
        return RoundResult(decision=None, problem=problem, status_written=written)

    async def _patch_status(self, fetchpool: Mapping[str, Any], new_status: Mapping[str, Any]) -> bool:
        """Merge-patch what differs between the status and ``new_status``; ``False`` when nothing did."""
        patch = merge_patch(fetchpool.get("status") or {}, new_status)
        if not patch:
            return False
        meta = fetchpool.get("metadata") or {}
        await self.kube.patch_fetchpool_status(meta.get("namespace", ""), meta.get("name", ""), patch)
        return True

    def forget(self, namespace: str, name: str) -> None:
        """Drop in-memory state of a deleted FetchPool."""
        state = self._keys.pop((namespace, name), None)
        if state is not None and state.timer is not None:
            state.timer.cancel()


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) turning the keys of ``new`` in ``old`` into ``new``'s values.

    Only keys present in ``new`` are considered at the top level (other status keys, e.g. kopf's,
    are left alone); below it, keys missing from ``new`` are removed (``None``). Lists are replaced.
    """
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            inner = merge_patch(before, value)
            inner.update({k: None for k in before if k not in value})
            if inner:
                patch[key] = inner
        elif resource.dumps(before) != resource.dumps(value):
            patch[key] = value
    return patch
