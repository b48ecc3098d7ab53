"""``FetchPool.status`` and its conditions, built from one round's outcome. Pure.

Conditions (``metav1.Condition``; the reasons are the ``*`` constants below):

- ``Ready``: every ready pod holds the per-replica limit decided (``LimitsApplied``); otherwise why
  not (``PodsUnreachable``, ``GrowthLimited`` while other pods' counts leave no room yet, or the
  reason the FetchPool was refused).
- ``Degraded``: the most important problem (:data:`SEVERITY`); the message lists them all.
- ``Conflict``: another, older FetchPool divides the same Deployment (``TargetClaimed``): this one
  writes and pushes nothing until that one is gone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fetchpool.operator import resource
from fetchpool.operator.budget import BUDGET_BELOW_MINIMUM, OVER_BUDGET
from fetchpool.operator.policy import DEFAULT_POOL, FORMULA_INPUTS_UNAVAILABLE, Limits, Pending, Problem

__all__ = [
    "CONFLICT",
    "HPA_NOT_FOUND",
    "INVALID_SPEC",
    "PODS_UNREACHABLE",
    "TARGET_NOT_FOUND",
    "RoundFacts",
    "conditions",
    "merge_patch",
    "refusal",
    "round_status",
]

PODS_UNREACHABLE = "PodsUnreachable"
INVALID_SPEC = "InvalidSpec"
TARGET_NOT_FOUND = "TargetNotFound"
HPA_NOT_FOUND = "HPANotFound"
CONFLICT = "Conflict"
LIMITS_APPLIED = "LimitsApplied"
GROWTH_LIMITED = "GrowthLimited"

#: Degraded reasons, most important first (the condition shows the first; the message lists all).
SEVERITY = [
    INVALID_SPEC,
    CONFLICT,
    TARGET_NOT_FOUND,
    BUDGET_BELOW_MINIMUM,
    OVER_BUDGET,
    PODS_UNREACHABLE,
    HPA_NOT_FOUND,
    FORMULA_INPUTS_UNAVAILABLE,
]


@dataclass(frozen=True, kw_only=True)
class RoundFacts:
    """What one round found and did, for the status (counts are pods, sizes connections)."""

    budget: int
    limits: Mapping[str, Limits]
    pending: Pending | None
    stabilization_seconds: float
    hpa: str | None
    counts: Mapping[str, int | None]
    ceiling: int
    start: int
    held: int
    reserved: int
    offered: Mapping[str, Limits]
    ready: int
    at_target: int
    below_target: int
    unreachable: Sequence[Mapping[str, str]]
    problems: Sequence[Problem]
    applied_at: str
    config_map: str
    extras: Mapping[str, float]


def degraded(problems: Sequence[Problem]) -> resource.Condition:
    """The ``Degraded`` condition of ``problems`` (the most severe names the reason)."""
    if not problems:
        return resource.Condition(type="Degraded", status=False, reason="AsExpected", message="")
    ordered = sorted(problems, key=lambda p: SEVERITY.index(p.reason) if p.reason in SEVERITY else 99)
    return resource.Condition(
        type="Degraded", status=True, reason=ordered[0].reason, message="; ".join(p.message for p in ordered)
    )


def _no_conflict() -> resource.Condition:
    return resource.Condition(type="Conflict", status=False, reason="TargetNotShared", message="")


def round_status(fetchpool: Mapping[str, Any], facts: RoundFacts, *, now: float) -> dict[str, Any]:
    """The status after a round that divided the budget."""
    per_replica = facts.limits[DEFAULT_POOL].max_connections
    fleet = facts.held + facts.reserved
    message = (
        f"{per_replica} connections per ready replica ({facts.ready} ready); the fleet may open {fleet} of "
        f"{facts.budget} ({facts.held} held by {facts.counts.get('pods', 0)} + {facts.counts.get('terminating', 0)} "
        f"terminating pods, {facts.reserved} kept for pods that may start, ceiling {facts.ceiling} at "
        f"{facts.start} each); {facts.at_target} of {facts.ready} ready pods confirmed {per_replica}"
    )
    if facts.pending is not None:
        goal = facts.pending.limits[DEFAULT_POOL].max_connections
        until = resource.format_time(facts.pending.since + facts.stabilization_seconds)
        message += f"; change to {goal} per replica pending until {until}"
    if facts.unreachable:
        ready = resource.Condition(type="Ready", status=False, reason=PODS_UNREACHABLE, message=message)
    elif facts.below_target:
        message += f"; {facts.below_target} pods wait for room to grow"
        ready = resource.Condition(type="Ready", status=False, reason=GROWTH_LIMITED, message=message)
    else:
        ready = resource.Condition(type="Ready", status=True, reason=LIMITS_APPLIED, message=message)
    limits: dict[str, Any] = resource.limits_to_status(facts.limits)
    limits.update(facts.extras)
    pending = None
    if facts.pending is not None:
        pending = {
            "limits": resource.limits_to_status(facts.pending.limits),
            "since": resource.format_time(facts.pending.since),
            "notBefore": resource.format_time(facts.pending.since + facts.stabilization_seconds),
        }
    holders = (facts.counts.get("replicas") or 0) + (facts.counts.get("terminating") or 0)
    generation = (fetchpool.get("metadata") or {}).get("generation")
    return {
        "observedGeneration": generation,
        "observedReplicas": holders,
        "replicas": {
            **{k: v for k, v in facts.counts.items() if k != "replicas"},
            "holders": holders,
            "ready": facts.ready,
            "ceiling": facts.ceiling,
        },
        "hpa": facts.hpa,
        "limits": limits,
        "startLimit": facts.start,
        "ceiling": facts.ceiling,
        "limitSum": facts.held,
        "reserved": facts.reserved,
        "fleetConnections": fleet,
        "offered": resource.limits_to_status(facts.offered) if facts.offered else None,
        "appliedAt": facts.applied_at,
        "pending": pending,
        "configMap": facts.config_map,
        "delivery": {
            "ready": facts.ready,
            "confirmed": facts.at_target,
            "unreachable": [dict(u) for u in facts.unreachable],
        },
        "conditions": conditions(fetchpool, [ready, degraded(facts.problems), _no_conflict()], now=now),
    }


def refusal(fetchpool: Mapping[str, Any], problem: Problem, *, now: float) -> dict[str, Any]:
    """The status of a FetchPool refused before anything was written: pods keep what they hold."""
    status = fetchpool.get("status") or {}
    kept = resource.limits_from_status(status.get("limits"))
    if problem.reason == CONFLICT:
        note = "; this FetchPool writes and pushes nothing"
    elif DEFAULT_POOL in kept:
        note = f"; pods keep their last good limits ({kept[DEFAULT_POOL].max_connections} per replica)"
    else:
        note = "; no limits were applied yet"
    conflict = (
        resource.Condition(type="Conflict", status=True, reason="TargetClaimed", message=problem.message)
        if problem.reason == CONFLICT
        else _no_conflict()
    )
    return {
        "observedGeneration": (fetchpool.get("metadata") or {}).get("generation"),
        "conditions": conditions(
            fetchpool,
            [
                resource.Condition(type="Ready", status=False, reason=problem.reason, message=problem.message + note),
                resource.Condition(type="Degraded", status=True, reason=problem.reason, message=problem.message),
                conflict,
            ],
            now=now,
        ),
    }


def conditions(fetchpool: Mapping[str, Any], new: Sequence[resource.Condition], *, now: float) -> list[dict[str, Any]]:
    """``status.conditions`` with ``new``; transition times move only when a status flips."""
    return resource.conditions_patch(
        (fetchpool.get("status") or {}).get("conditions"),
        new,
        now=now,
        generation=(fetchpool.get("metadata") or {}).get("generation"),
    )


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
