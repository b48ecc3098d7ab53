"""What the operator knows of the pods, and the two exchanges of a round that change what they hold.

A :class:`Fleet` keeps, per pod (by uid), what its process confirmed holding, what was sent to it
without an answer, and whether it is *fresh* (started from the limits file, sent nothing since).
:meth:`Fleet.observe` turns a round's API reads into a :class:`Round` with its
:class:`~fetchpool.operator.budget.Ledger` (every live pod counted as budget.py's "Counting" says);
:meth:`Fleet.lower` and :meth:`Fleet.raise_` are steps 2 and 3 of a round
(:mod:`fetchpool.operator.reconciler`). The knowledge is in memory only: an operator that restarts
starts from nothing and from ``status.offered``, which is why raises are written ahead there.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fetchpool.operator import pods, resource
from fetchpool.operator.budget import Ledger, ceiling, water_level
from fetchpool.operator.delivery import Delivery, PodOutcome, PodPlan, PodTarget, PoolExtras
from fetchpool.operator.health import Health
from fetchpool.operator.policy import DEFAULT_POOL, Decision, FleetObservation, Limits, Mode, Problem

__all__ = ["Fleet", "Round", "limits_of", "read_limits_file"]

log = logging.getLogger(__name__)


@dataclass
class _Record:
    """What this operator knows of one pod's process (budget key -> connections).

    ``confirmed``: what the pod reported holding (``None``: never asked); ``offered``: larger limits
    sent that it did not confirm; ``fresh``: its process started from the limits file and was sent
    nothing since (seen before it started, or restarted since); ``silent``: its last exchange failed.
    """

    restarts: int
    confirmed: dict[str, int] | None = None
    offered: dict[str, int] = field(default_factory=dict)
    fresh: bool = False
    silent: bool = False


@dataclass
class Round:
    """One round's observations, ledger and what the exchanges found (the reconciler records it)."""

    fetchpool: Mapping[str, Any]
    spec: resource.FetchPoolSpec
    now: float
    live: list[pods.PodView]
    ready: list[pods.PodView]
    counts: dict[str, int | None]
    ledger: Ledger
    start_file: int
    offered: dict[str, int]
    problems: list[Problem] = field(default_factory=list)
    failed: dict[str, PodOutcome] = field(default_factory=dict)
    outcomes: list[PodOutcome] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return sorted(self.spec.sizing.budgets())

    @property
    def key(self) -> tuple[str, str]:
        meta = self.fetchpool.get("metadata") or {}
        return str(meta.get("namespace", "")), str(meta.get("name", ""))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Fleet:
    """The operator's knowledge of every pod it has seen, and the exchanges that update it."""

    def __init__(self, delivery: Delivery, health: Health) -> None:
        self.delivery = delivery
        self.health = health
        self._records: dict[str, _Record] = {}

    def observe(
        self,
        fetchpool: Mapping[str, Any],
        spec: resource.FetchPoolSpec,
        deployment: Mapping[str, Any],
        hpa: Mapping[str, Any] | None,
        raw_pods: list[dict[str, Any]],
        cm: Mapping[str, Any] | None,
        now: float,
    ) -> Round:
        views = [pods.pod_view(p, spec.grpc_port) for p in raw_pods]
        live = [p for p in views if p.live]
        existing = [p for p in live if not p.terminating]
        hpa_spec, hpa_status = (hpa or {}).get("spec") or {}, (hpa or {}).get("status") or {}
        counts: dict[str, int | None] = {
            "current": _int(hpa_status.get("currentReplicas")),
            "desired": _int(hpa_status.get("desiredReplicas")),
            "deployment": _int((deployment.get("spec") or {}).get("replicas")),
            "deploymentStatus": _int((deployment.get("status") or {}).get("replicas")),
            "pods": len(existing),
            "terminating": len(live) - len(existing),
        }
        counts["replicas"] = max([1, *(v for k, v in counts.items() if k != "terminating" and v is not None)])
        scaler_max = _int(hpa_spec.get("maxReplicas")) if hpa is not None else None
        surge = resource.max_surge_of(deployment, scaler_max if scaler_max is not None else counts["replicas"] or 1)
        limit_ceiling = ceiling(scaler_max=scaler_max, counts=[counts["replicas"]], surge=surge)
        old_file = read_limits_file(cm) or {}
        start = spec.sizing.min_per_replica
        start_file = max(start, _int(old_file.get("max_connections")) or 0)
        ledger = Ledger(
            spec.sizing.budgets(), start=start_file, slots=limit_ceiling - len(existing), ceiling=limit_ceiling
        )
        work = Round(
            fetchpool=fetchpool,
            spec=spec,
            now=now,
            live=live,
            ready=[p for p in existing if p.ready and p.address],
            counts=counts,
            ledger=ledger,
            start_file=start_file,
            offered=resource.offered_from_status(fetchpool.get("status")),
        )
        alive = {p.uid for p in views}
        for uid in [u for u in self._records if u not in alive]:
            del self._records[uid]
        for pod in live:
            self._track(pod)
        self._count(work)
        return work

    def _track(self, pod: pods.PodView) -> _Record:
        record = self._records.get(pod.uid)
        if record is None:
            record = _Record(restarts=pod.restarts, fresh=not pod.started)
        elif record.restarts != pod.restarts:
            record = _Record(restarts=pod.restarts, fresh=True)  # a new process, started from the file
        self._records[pod.uid] = record
        return record

    def _count(self, work: Round) -> None:
        """Put every live pod in the ledger at what it may hold (budget.py's "Counting")."""
        for pod in work.live:
            record = self._records[pod.uid]
            if record.confirmed is not None:
                base = {k: record.confirmed.get(k, 0) for k in work.keys}
            elif record.fresh:
                base = {k: work.start_file for k in work.keys}
            else:
                base = {k: max(work.start_file, work.offered.get(k, 0)) for k in work.keys}
            work.ledger.hold(pod.name, {k: max(base[k], record.offered.get(k, 0)) for k in work.keys})

    async def share(self, work: Round) -> FleetObservation:
        """What the ready pods share. A ready pod whose last exchange failed is not among them: it
        counts at what it may hold (perhaps more than its share), and the others divide the rest."""
        spec = work.spec
        names = [p.name for p in work.ready if not self._records[p.uid].silent] or [p.name for p in work.ready]
        demand: dict[str, float] = {}
        if spec.sizing.mode is Mode.FORMULA and (
            spec.sizing.formula is None or spec.sizing.formula.concurrency is None
        ):
            targets = [PodTarget(name=p.name, address=p.address or "") for p in work.ready]
            demand = _mean_demand(await self.delivery.demand(targets), spec.sizing.budgets())
        available = {k: work.ledger.available_to(names, k) for k in work.keys}
        return FleetObservation(available=available, ready=len(names), demand_per_replica=demand)

    @staticmethod
    def start_limits(spec: resource.FetchPoolSpec) -> dict[str, Limits]:
        """The start limit on every budget key: ``minPerReplica``."""
        return {k: limits_of(spec, spec.sizing.min_per_replica) for k in spec.sizing.budgets()}

    # --- lowering and raising ---------------------------------------------------------------

    async def lower(self, work: Round, decision: Decision, extras: PoolExtras, *, full: bool) -> None:
        """Step 2: lower every running pod above its limit and read the ones never confirmed. Ready
        and terminating pods (still serving their last calls) are lowered to the per-replica limit;
        pods not ready yet (no caller reaches them) to the start limit, which frees room at once."""
        start = self.start_limits(work.spec)
        ready = {p.name for p in work.ready}
        plans = []
        for pod in work.live:
            if not (pod.started and pod.address):
                continue
            limits = decision.limits if pod.name in ready or pod.terminating else start
            record = self._records[pod.uid]
            above = record.confirmed is None or any(
                record.confirmed.get(k, 0) > limits[k].max_connections for k in record.confirmed if k in limits
            )
            if full or above or record.offered or record.silent:
                plans.append(PodPlan(target=_target(pod), limits=limits, lower_only=True))
        await self._push(work, plans, extras, offered={})

    async def raise_(
        self,
        work: Round,
        decision: Decision,
        extras: PoolExtras,
        write_ahead: Callable[[Mapping[str, Any]], Awaitable[None]],
    ) -> None:
        """Step 3: raise the ready pods below the limit, as far as the ledger has room."""
        candidates = [
            p for p in work.ready if p.name not in work.failed and _below(self._records[p.uid], decision.limits)
        ]
        if not candidates:
            return
        levels = {}
        for k in work.keys:
            current = [c for p in candidates if (c := (self._records[p.uid].confirmed or {}).get(k)) is not None]
            levels[k] = water_level(current, work.ledger.headroom(k), decision.limits[k].max_connections)
        plans, offers = [], {}
        for pod in candidates:
            confirmed = self._records[pod.uid].confirmed or {}
            new = {k: max(n, levels[k]) for k, n in confirmed.items() if k in levels}
            if any(new[k] > confirmed[k] for k in new):
                limits = {k: limits_of(work.spec, new.get(k, decision.limits[k].max_connections)) for k in work.keys}
                plans.append(PodPlan(target=_target(pod), limits=limits))
                offers[pod.name] = new
        if not plans:
            return
        offered = {k: max([work.offered.get(k, 0), *(o.get(k, 0) for o in offers.values())]) for k in work.keys}
        if offered != {k: work.offered.get(k, 0) for k in work.keys}:
            await write_ahead(
                {"offered": resource.limits_to_status({k: limits_of(work.spec, n) for k, n in offered.items()})}
            )
            work.offered = offered
        await self._push(work, plans, extras, offered=offers)

    async def _push(
        self, work: Round, plans: list[PodPlan], extras: PoolExtras, *, offered: Mapping[str, Mapping[str, int]]
    ) -> None:
        """Send ``plans``; count raises before they are sent, and what every answer says after."""
        if not plans:
            return
        by_name = {p.name: p for p in work.live}
        ready = {p.name for p in work.ready}
        for name, limits in offered.items():
            record = self._records[by_name[name].uid]
            record.offered = {k: max(record.offered.get(k, 0), n) for k, n in limits.items()}
        self._count(work)
        outcomes = await self.delivery.push(plans, extras)
        keys = set(work.spec.sizing.budgets())
        for outcome in outcomes:
            record = self._records[by_name[outcome.name].uid]
            work.outcomes.append(outcome)
            record.silent = not outcome.ok
            if outcome.ok:
                record.confirmed = _by_key(outcome.in_force, keys)
                record.offered = {}
                record.fresh = False
                work.failed.pop(outcome.name, None)
            elif outcome.name in ready:  # a pod not ready yet may well not listen yet
                work.failed[outcome.name] = outcome
                self.health.delivery_failed(*work.key)
                log.warning("pod %s (%s) did not take limits: %s", outcome.name, outcome.address, outcome.error)
        self._count(work)

    def at(self, pod: pods.PodView, limits: Mapping[str, Limits]) -> bool:
        """Whether ``pod`` confirmed exactly ``limits`` on every budget key it has a pool for."""
        record = self._records.get(pod.uid)
        if record is None or record.confirmed is None or record.offered:
            return False
        return all(n == limits[k].max_connections for k, n in record.confirmed.items() if k in limits)

    def settle_offered(self, work: Round) -> None:
        """Once every live pod is known (confirmed, or fresh from the file), ``status.offered`` comes
        down to the most any of them holds: an operator started later has nothing larger to fear."""
        records = [self._records[p.uid] for p in work.live]
        if all((r.confirmed is not None or r.fresh) and not r.offered for r in records):
            work.offered = {k: max([0, *((r.confirmed or {}).get(k, 0) for r in records)]) for k in work.keys}


# --- helpers ----------------------------------------------------------------------------------


def _target(pod: pods.PodView) -> PodTarget:
    return PodTarget(name=pod.name, address=pod.address or "")


def limits_of(spec: resource.FetchPoolSpec, connections: int) -> Limits:
    """``connections`` with the spec's share of them kept alive."""
    keepalive = min(connections, math.floor(connections * spec.sizing.keepalive_share + 1e-9))
    return Limits(max_connections=connections, max_keepalive_connections=keepalive)


def _below(record: _Record, limits: Mapping[str, Limits]) -> bool:
    """Whether a pod confirmed less than ``limits`` on a budget key it has a pool for."""
    confirmed = record.confirmed
    return confirmed is not None and any(n < limits[k].max_connections for k, n in confirmed.items() if k in limits)


def _by_key(in_force: Mapping[str, int], keys: set[str]) -> dict[str, int]:
    """Pool name -> connections, as budget key -> the most any of the key's pools holds."""
    out: dict[str, int] = {}
    for pool, connections in in_force.items():
        key = pool if pool in keys else DEFAULT_POOL
        out[key] = max(out.get(key, 0), connections)
    return out


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


def read_limits_file(cm: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``limits.json`` of the limits ConfigMap; ``None`` when absent or unreadable."""
    if not cm:
        return None
    raw = (cm.get("data") or {}).get(resource.LIMITS_KEY)
    try:
        loaded = json.loads(raw) if raw else None
    except ValueError:
        return None
    return loaded if isinstance(loaded, dict) else None
