"""One reconciliation round for a ``FetchPool``: observe, count, lower, raise, record.

Level-triggered: every round reads the FetchPool, its Deployment, its HPA (if any) and the pods
afresh, counts what every live pod may hold (:mod:`fetchpool.operator.budget`), sizes the ready
replicas with :func:`fetchpool.operator.policy.decide` from that plus what the previous round
recorded in ``FetchPool.status``, and converges the world on the result. It does not matter which
event triggered it, or how many events arrived meanwhile: triggers for one FetchPool are coalesced
(one round runs, at most one more is queued) and the queued round sees the newest state.

Order of writes in a round; the ledger stays within the budget after each one, so an operator
stopped anywhere in between leaves a fleet within it:

1. the limits ConfigMap gets the smaller of its old and new start limits (a pod starting now starts
   within both);
2. every ready pod above the per-replica limit is lowered to it (lower-only exchanges, concurrently,
   each under its own deadline); the same exchange reads what a pod not confirmed before holds;
3. when pods are below the limit and the ledger has room: ``status.offered`` is raised first
   (written ahead, so an operator restarted later counts a pod it cannot reach at that), then those
   pods are raised as far as the room allows - evenly, the lowest first;
4. the ConfigMap gets the new start limits;
5. the status records the counts, the ledger, the limits, pending changes, unreachable pods and the
   ``Ready`` / ``Degraded`` / ``Conflict`` conditions (patched only when something changed).

Bad input (invalid spec, an older FetchPool on the same Deployment, a missing Deployment) stops the
round before step 1: pods and ConfigMap keep what they hold and the conditions say exactly why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fetchpool.operator import resource, status
from fetchpool.operator.delivery import Delivery, PodOutcome, PoolExtras
from fetchpool.operator.fleet import Fleet, Round, limits_of, read_limits_file
from fetchpool.operator.health import Health, PoolReport
from fetchpool.operator.k8s import KubeIO
from fetchpool.operator.policy import DEFAULT_POOL, Decision, Problem, decide

__all__ = ["Reconciler", "RoundResult"]

log = logging.getLogger(__name__)

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
        active: Callable[[str], Any] | None = None,
    ) -> None:
        self.kube = kube
        self.delivery = delivery
        self.health = health or Health()
        self.retry_seconds = retry_seconds
        self._clock = clock
        #: ``await active(namespace)`` -> whether this operator may act there (kopf peering).
        self._active = active
        self._keys: dict[Key, _KeyState] = {}
        self.fleet = Fleet(delivery, self.health)

    # --- triggering -------------------------------------------------------------------------

    async def trigger(self, namespace: str, name: str, *, reason: str = "", full: bool = False) -> None:
        """Run a round for ``namespace/name`` now, or make sure one runs after the current one.

        ``full`` re-reads every ready pod even when it confirmed the limits before (the resync uses it
        to correct pods changed behind the operator's back). Never raises.
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
            try:
                await self.reconcile(namespace, name, full=full)
            except Exception as exc:  # level-triggered: the next trigger or the timer retries
                self.health.reconcile_failed(namespace, name)
                log.warning("reconcile %s/%s failed: %s", namespace, name, exc, exc_info=True)
                self.schedule(namespace, name, self.retry_seconds, reason="retry after error")
            finally:
                self.health.reconciled(namespace, name)

    def schedule(self, namespace: str, name: str, delay: float, *, reason: str = "scheduled") -> None:
        """Trigger a round after ``delay`` seconds (the earliest of several schedules wins); skipped
        while another operator is in charge (a paused kopf peer)."""
        state = self._keys.setdefault((namespace, name), _KeyState())
        due = time.monotonic() + max(0.0, delay)
        if state.timer is not None and not state.timer.done():
            if state.timer_due <= due:
                return
            state.timer.cancel()

        async def later() -> None:
            await asyncio.sleep(max(0.0, delay))
            state.timer = None
            if await self.may_act(namespace):
                await self.trigger(namespace, name, reason=reason)

        state.timer_due = due
        state.timer = asyncio.get_running_loop().create_task(later(), name=f"fetchpool-reconcile-{namespace}/{name}")

    async def may_act(self, namespace: str) -> bool:
        """Whether this operator is the active peer for ``namespace`` (always, without peering)."""
        return True if self._active is None else bool(await self._active(namespace))

    async def close(self) -> None:
        """Cancel scheduled rounds."""
        for state in self._keys.values():
            if state.timer is not None:
                state.timer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await state.timer

    def forget(self, namespace: str, name: str) -> None:
        """Drop in-memory state of a deleted FetchPool."""
        state = self._keys.pop((namespace, name), None)
        if state is not None and state.timer is not None:
            state.timer.cancel()
        self.health.forget(namespace, name)

    # --- one round --------------------------------------------------------------------------

    async def reconcile(self, namespace: str, name: str, *, full: bool = False) -> RoundResult:
        """One round (see the module docstring). Raises on API errors."""
        fetchpool = await self.kube.get_fetchpool(namespace, name)
        if fetchpool is None:
            self.forget(namespace, name)
            return RoundResult(decision=None)
        now = self._clock()
        spec, problems = resource.parse_spec(name, fetchpool.get("spec"))
        if spec is None:
            return await self._refuse(fetchpool, Problem(reason=status.INVALID_SPEC, message="; ".join(problems)), now)
        owner = resource.claimant(await self.kube.list_fetchpools(namespace), spec.deployment)
        if owner is not None and owner != name:
            message = (
                f"FetchPool {namespace}/{owner} (created first) already divides the budget of "
                f"Deployment {spec.deployment}"
            )
            return await self._refuse(fetchpool, Problem(reason=status.CONFLICT, message=message), now, spec=spec)
        deployment = await self.kube.get_deployment(namespace, spec.deployment)
        if deployment is None:
            message = f"Deployment {namespace}/{spec.deployment} (spec.target.name) not found"
            return await self._refuse(
                fetchpool, Problem(reason=status.TARGET_NOT_FOUND, message=message), now, spec=spec
            )
        hpa = await self.kube.find_hpa(namespace, spec.deployment, spec.hpa_name)
        pods = await self.kube.list_pods(namespace, (deployment.get("spec") or {}).get("selector"))
        cm = await self.kube.get_configmap(namespace, spec.config_map)
        work = self.fleet.observe(fetchpool, spec, deployment, hpa, pods, cm, now)
        if spec.hpa_name and hpa is None:
            work.problems.append(
                Problem(
                    reason=status.HPA_NOT_FOUND,
                    message=f"HorizontalPodAutoscaler {namespace}/{spec.hpa_name} (spec.target.hpaName) not found: "
                    f"dividing by the Deployment's replicas",
                )
            )
        decision = decide(
            spec.sizing,
            await self.fleet.share(work),
            resource.in_force_from_status(
                fetchpool.get("status") or {}, (fetchpool.get("metadata") or {}).get("generation")
            ),
            now=now,
        )
        extras = PoolExtras(
            keepalive_expiry_seconds=spec.keepalive_expiry_seconds, pool_timeout_seconds=spec.pool_timeout_seconds
        )
        old_file = read_limits_file(cm)
        first_file, new_file = _limits_files(spec, old_file, extras)
        if old_file != first_file:
            await self._write_cm(work, first_file, decision)
        await self.fleet.lower(work, decision, extras, full=full)

        async def write_ahead(patch: Mapping[str, Any]) -> None:
            await self.kube.patch_fetchpool_status(namespace, name, patch)

        await self.fleet.raise_(work, decision, extras, write_ahead)
        if first_file != new_file:
            await self._write_cm(work, new_file, decision)
        return await self._finish(work, decision, hpa, extras)

    # --- recording ----------------------------------------------------------------------------

    async def _write_cm(self, work: Round, limits: Mapping[str, Any], decision: Decision) -> None:
        meta = work.fetchpool.get("metadata") or {}
        owner = {
            "apiVersion": f"{resource.GROUP}/{resource.VERSION}",
            "kind": resource.KIND,
            "name": meta.get("name", ""),
            "uid": meta.get("uid", ""),
            "controller": True,
            "blockOwnerDeletion": False,
        }
        await self.kube.write_configmap(
            meta.get("namespace", ""),
            work.spec.config_map,
            {
                resource.LIMITS_KEY: resource.dumps(limits),
                resource.POOLS_KEY: resource.dumps(resource.limits_to_status(decision.limits)),
            },
            owner=owner,
            labels={"app.kubernetes.io/managed-by": "fetchpool-operator"},
        )

    async def _finish(
        self, work: Round, decision: Decision, hpa: Mapping[str, Any] | None, extras: PoolExtras
    ) -> RoundResult:
        namespace, name = _key_of(work.fetchpool)
        previous = work.fetchpool.get("status") or {}
        unreachable = _unreachable(work, previous)
        problems = [*work.problems, *decision.problems, *work.ledger.problems()]
        if unreachable:
            names = ", ".join(f"{u['pod']} ({u['address']}): {u['error']}" for u in unreachable)
            problems.append(
                Problem(
                    reason=status.PODS_UNREACHABLE,
                    message=f"{len(unreachable)} of {len(work.ready)} ready pods did not take the limits, "
                    f"retrying every {self.retry_seconds:g}s; each counts at the larger of its old and new "
                    f"limit: {names}",
                )
            )
        at_target = sum(1 for p in work.ready if self.fleet.at(p, decision.limits))
        below = sum(1 for p in work.ready if p.name not in work.failed and not self.fleet.at(p, decision.limits))
        limits_changed = resource.limits_from_status(previous.get("limits")) != dict(decision.limits)
        self.fleet.settle_offered(work)
        applied_at = (
            resource.format_time(work.now) if limits_changed or not previous.get("appliedAt") else previous["appliedAt"]
        )
        extra_fields = {
            k: v
            for k, v in (
                ("keepaliveExpirySeconds", extras.keepalive_expiry_seconds),
                ("poolTimeoutSeconds", extras.pool_timeout_seconds),
            )
            if v is not None
        }
        facts = status.RoundFacts(
            budget=work.spec.sizing.connection_budget,
            limits=decision.limits,
            pending=decision.pending,
            stabilization_seconds=work.spec.sizing.stabilization_seconds,
            hpa=(hpa.get("metadata") or {}).get("name") if hpa is not None else None,
            counts=work.counts,
            ceiling=work.ledger.ceiling,
            start=work.start_file,
            held=work.ledger.held(DEFAULT_POOL),
            reserved=work.ledger.reserved(),
            offered={k: limits_of(work.spec, n) for k, n in work.offered.items() if n},
            ready=len(work.ready),
            at_target=at_target,
            below_target=below,
            unreachable=unreachable,
            problems=problems,
            applied_at=applied_at,
            config_map=work.spec.config_map,
            extras=extra_fields,
        )
        new_status = status.round_status(work.fetchpool, facts, now=work.now)
        written = await self._patch_status(work.fetchpool, new_status)
        self.health.report(
            namespace,
            name,
            PoolReport(
                budget=facts.budget,
                limit_sum=facts.held,
                replicas=facts.ready,
                per_replica=decision.limits[DEFAULT_POOL].max_connections,
                unconfirmed=sum(1 for p in work.live if not p.terminating and not self.fleet.at(p, decision.limits)),
                conditions=_conditions(new_status),
            ),
        )
        if work.failed or below:
            self.schedule(namespace, name, self.retry_seconds, reason="retry pods not at their limit")
        elif decision.pending is not None:
            wait = decision.pending.since + work.spec.sizing.stabilization_seconds - work.now
            self.schedule(namespace, name, max(0.0, wait) + 0.05, reason="pending change due")
        if limits_changed:
            log.info(
                "%s/%s: %d per ready replica (%d ready), fleet may open %d of %d",
                namespace,
                name,
                decision.limits[DEFAULT_POOL].max_connections,
                len(work.ready),
                facts.held + facts.reserved,
                facts.budget,
            )
        return RoundResult(decision=decision, outcomes=tuple(work.outcomes), status_written=written)

    async def _refuse(
        self, fetchpool: Mapping[str, Any], problem: Problem, now: float, *, spec: resource.FetchPoolSpec | None = None
    ) -> RoundResult:
        """Bad input: keep what pods and ConfigMap hold, say exactly what is wrong."""
        namespace, name = _key_of(fetchpool)
        log.warning("%s/%s: %s: %s", namespace, name, problem.reason, problem.message)
        new_status = status.refusal(fetchpool, problem, now=now)
        written = await self._patch_status(fetchpool, new_status)
        self.health.report(
            namespace,
            name,
            PoolReport(
                budget=spec.sizing.connection_budget if spec is not None else None,
                conditions=_conditions(new_status),
            ),
        )
        return RoundResult(decision=None, problem=problem, status_written=written)

    async def _patch_status(self, fetchpool: Mapping[str, Any], new_status: Mapping[str, Any]) -> bool:
        """Merge-patch what differs between the status and ``new_status``; ``False`` when nothing did."""
        patch = status.merge_patch(fetchpool.get("status") or {}, new_status)
        if not patch:
            return False
        namespace, name = _key_of(fetchpool)
        await self.kube.patch_fetchpool_status(namespace, name, patch)
        return True


# --- helpers ----------------------------------------------------------------------------------


def _limits_files(
    spec: resource.FetchPoolSpec, old: Mapping[str, Any] | None, extras: PoolExtras
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The limits file to write first (the smaller of the old and new start limits: a pod starting
    during the round starts within both) and last (the new one)."""
    new = resource.limits_file(
        Fleet.start_limits(spec),
        keepalive_expiry_seconds=extras.keepalive_expiry_seconds,
        pool_timeout_seconds=extras.pool_timeout_seconds,
    )
    first = dict(new)
    for key in ("max_connections", "max_keepalive_connections"):
        if old is not None and isinstance(old.get(key), int):
            first[key] = min(int(old[key]), int(new[key]))
    return first, new


def _unreachable(work: Round, previous: Mapping[str, Any]) -> list[dict[str, str]]:
    """``status.delivery.unreachable``: the ready pods that failed this round, each since it first did."""
    before = {
        u.get("pod"): u for u in (previous.get("delivery") or {}).get("unreachable") or [] if isinstance(u, Mapping)
    }
    return [
        {
            "pod": o.name,
            "address": o.address,
            "error": o.error or "",
            "since": (before.get(o.name) or {}).get("since") or resource.format_time(work.now),
        }
        for o in sorted(work.failed.values(), key=lambda o: o.name)
    ]


def _conditions(new_status: Mapping[str, Any]) -> tuple[tuple[str, str, str], ...]:
    return tuple((c["type"], c["status"], c["reason"]) for c in new_status["conditions"])


def _key_of(fetchpool: Mapping[str, Any]) -> Key:
    meta = fetchpool.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))
