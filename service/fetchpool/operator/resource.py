"""The ``FetchPool`` resource and the Kubernetes objects the operator reads, as plain JSON dicts.

Pure functions only (no API calls): parse the spec, read the status back into policy inputs, build
the status, the limits-file content and the conditions, and interpret Pods. The CRD itself is
``helm/fetchpool/crds/fetchpool.io_fetchpools.yaml``; keep the two in step.

Pod addresses
    The operator calls each ready pod's ``PoolAdmin`` service at ``status.podIP`` and the first of:
    the pod annotation ``fetchpool.io/grpc-port`` (lets several "pods" share one IP in tests on
    loopback), a container port named ``grpc``, or ``spec.grpcPort`` (default 50051).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fetchpool.operator.budget import max_surge
from fetchpool.operator.policy import (
    DEFAULT_POOL,
    FormulaInputs,
    InForce,
    Limits,
    Mode,
    Pending,
    SizingSpec,
    validate,
)

__all__ = [
    "ANNOTATION_GRPC_PORT",
    "DEFAULT_GRPC_PORT",
    "GROUP",
    "KIND",
    "LIMITS_KEY",
    "PLURAL",
    "POOLS_KEY",
    "VERSION",
    "Condition",
    "FetchPoolSpec",
    "claimant",
    "conditions_patch",
    "dumps",
    "format_time",
    "in_force_from_status",
    "limits_file",
    "limits_from_status",
    "limits_to_status",
    "max_surge_of",
    "offered_from_status",
    "parse_spec",
    "parse_time",
]

GROUP = "fetchpool.io"
VERSION = "v1alpha1"
PLURAL = "fetchpools"
KIND = "FetchPool"

#: Pod annotation naming the pod's gRPC port (overrides container port ``grpc`` and ``spec.grpcPort``).
ANNOTATION_GRPC_PORT = "fetchpool.io/grpc-port"
DEFAULT_GRPC_PORT = 50051

#: ConfigMap keys: the service's ``--limits-file`` JSON, and per-pool limits (informative).
LIMITS_KEY = "limits.json"
POOLS_KEY = "pools.json"


@dataclass(frozen=True, kw_only=True, slots=True)
class FetchPoolSpec:
    """A parsed, valid ``FetchPool.spec``.

    - ``deployment``: the target Deployment's name (same namespace).
    - ``hpa_name``: the HPA to follow; ``None`` finds the one whose ``scaleTargetRef`` names it.
    - ``sizing``: the policy inputs.
    - ``config_map``: the ConfigMap holding ``limits.json`` (the pods' start-up limits).
    - ``grpc_port``: default ``PoolAdmin`` port of the pods.
    - ``keepalive_expiry_seconds`` / ``pool_timeout_seconds``: passed through to every pod, seconds.
    """

    deployment: str
    hpa_name: str | None
    sizing: SizingSpec
    config_map: str
    grpc_port: int = DEFAULT_GRPC_PORT
    keepalive_expiry_seconds: float | None = None
    pool_timeout_seconds: float | None = None


class _Problems(list[str]):
    def integer(self, raw: Mapping[str, Any], key: str, default: int | None, path: str) -> int | None:
        value = raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            self.append(f"{path} must be an integer, got {value!r}")
            return default
        return value

    def number(self, raw: Mapping[str, Any], key: str, default: float | None, path: str) -> float | None:
        value = raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.append(f"{path} must be a number, got {value!r}")
            return default
        return float(value)


def parse_spec(name: str, spec: Mapping[str, Any] | None) -> tuple[FetchPoolSpec | None, list[str]]:
    """Parse ``FetchPool.spec``; returns ``(spec, [])`` or ``(None, problems)``.

    Each problem is an exact sentence naming the field, for the ``Degraded`` condition's message.
    The CRD schema catches most of these in a real cluster; the operator checks again because an
    older CRD, a schema-less API (tests) or a ``kubectl edit --validate=false`` can let them in.
    """
    problems = _Problems()
    spec = spec if isinstance(spec, Mapping) else {}
    target = spec.get("target")
    deployment: str | None = None
    hpa_name: str | None = None
    if not isinstance(target, Mapping) or not target.get("name"):
        problems.append("spec.target.name is missing: name the Deployment whose replicas divide the budget")
    else:
        kind = target.get("kind", "Deployment")
        if kind != "Deployment":
            problems.append(f"spec.target.kind must be 'Deployment', got {kind!r}")
        deployment = str(target["name"])
        hpa_name = str(target["hpaName"]) if target.get("hpaName") else None

    budget = problems.integer(spec, "connectionBudget", None, "spec.connectionBudget")
    if budget is None and "connectionBudget" not in spec:
        problems.append("spec.connectionBudget is missing: the fleet's total connections per pool")
    proxy_budgets: dict[str, int] = {}
    raw_proxy = spec.get("proxyBudgets") or {}
    if not isinstance(raw_proxy, Mapping):
        problems.append(f"spec.proxyBudgets must be an object of pool name -> connections, got {raw_proxy!r}")
    else:
        for pool in raw_proxy:
            parsed = problems.integer(raw_proxy, pool, None, f"spec.proxyBudgets[{pool!r}]")
            if parsed is not None:
                proxy_budgets[str(pool)] = parsed
    min_per = problems.integer(spec, "minPerReplica", 1, "spec.minPerReplica")
    max_per = problems.integer(spec, "maxPerReplica", None, "spec.maxPerReplica")
    share = problems.number(spec, "keepaliveShare", 0.5, "spec.keepaliveShare")
    stabilization = problems.number(spec, "stabilizationSeconds", 30.0, "spec.stabilizationSeconds")
    grpc_port = problems.integer(spec, "grpcPort", DEFAULT_GRPC_PORT, "spec.grpcPort")
    if grpc_port is not None and not 1 <= grpc_port <= 65535:
        problems.append(f"spec.grpcPort must be in 1..65535, got {grpc_port}")
    expiry = problems.number(spec, "keepaliveExpirySeconds", None, "spec.keepaliveExpirySeconds")
    pool_timeout = problems.number(spec, "poolTimeoutSeconds", None, "spec.poolTimeoutSeconds")
    for path, value in (("spec.keepaliveExpirySeconds", expiry), ("spec.poolTimeoutSeconds", pool_timeout)):
        if value is not None and not (math.isfinite(value) and value > 0):
            problems.append(f"{path} must be > 0 seconds, got {value}")

    raw_mode = spec.get("mode", "budget")
    try:
        mode = Mode(raw_mode)
    except ValueError:
        problems.append(f"spec.mode must be 'budget' or 'formula', got {raw_mode!r}")
        mode = Mode.BUDGET
    formula: FormulaInputs | None = None
    raw_formula = spec.get("formula")
    if isinstance(raw_formula, Mapping):
        latency = problems.number(raw_formula, "latencySeconds", None, "spec.formula.latencySeconds")
        processing = problems.number(raw_formula, "processingTimeSeconds", None, "spec.formula.processingTimeSeconds")
        concurrency = problems.number(raw_formula, "concurrency", None, "spec.formula.concurrency")
        if mode is Mode.FORMULA and latency is None:
            problems.append("spec.formula.latencySeconds is missing (seconds a request holds a connection)")
        if mode is Mode.FORMULA and processing is None:
            problems.append("spec.formula.processingTimeSeconds is missing (seconds of work per response)")
        if latency is not None and processing is not None:
            formula = FormulaInputs(
                concurrency=concurrency, latency_seconds=latency, processing_time_seconds=processing
            )
    elif raw_formula is not None:
        problems.append(f"spec.formula must be an object, got {raw_formula!r}")

    if problems or deployment is None or budget is None:
        return None, list(problems)
    sizing = SizingSpec(
        connection_budget=budget,
        pool_budgets=proxy_budgets,
        min_per_replica=min_per if min_per is not None else 1,
        max_per_replica=max_per,
        keepalive_share=share if share is not None else 0.5,
        mode=mode,
        formula=formula,
        stabilization_seconds=stabilization if stabilization is not None else 30.0,
    )
    invalid = validate(sizing)  # ranges and cross-field rules, including a missing spec.formula
    if invalid:
        return None, invalid
    config_map = spec.get("configMapName") or f"{name}-limits"
    return (
        FetchPoolSpec(
            deployment=deployment,
            hpa_name=hpa_name,
            sizing=sizing,
            config_map=str(config_map),
            grpc_port=grpc_port if grpc_port is not None else DEFAULT_GRPC_PORT,
            keepalive_expiry_seconds=expiry,
            pool_timeout_seconds=pool_timeout,
        ),
        [],
    )


# --- time -------------------------------------------------------------------------------------


def format_time(ts: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-29T21:00:00.123Z``."""
    moment = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(value: Any) -> float | None:
    """POSIX seconds from an RFC 3339 string; ``None`` when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --- limits <-> status / limits file ------------------------------------------------------------


def _limits_json(limits: Limits) -> dict[str, int]:
    return {
        "maxConnections": limits.max_connections,
        "maxKeepaliveConnections": limits.max_keepalive_connections,
    }


def limits_to_status(limits: Mapping[str, Limits]) -> dict[str, Any]:
    """``{maxConnections, maxKeepaliveConnections, pools: {name: {...}}}`` for the status."""
    out: dict[str, Any] = dict(_limits_json(limits[DEFAULT_POOL])) if DEFAULT_POOL in limits else {}
    pools = {pool: _limits_json(value) for pool, value in sorted(limits.items()) if pool != DEFAULT_POOL}
    if pools:
        out["pools"] = pools
    return out


def _limits_from_json(raw: Any) -> Limits | None:
    if not isinstance(raw, Mapping):
        return None
    conns, keep = raw.get("maxConnections"), raw.get("maxKeepaliveConnections")
    if not isinstance(conns, int) or isinstance(conns, bool) or conns < 1:
        return None
    keep = keep if isinstance(keep, int) and not isinstance(keep, bool) and 0 <= keep <= conns else conns
    return Limits(max_connections=conns, max_keepalive_connections=keep)


def limits_from_status(raw: Any) -> dict[str, Limits]:
    """The inverse of :func:`limits_to_status`; unreadable entries are dropped."""
    out: dict[str, Limits] = {}
    if not isinstance(raw, Mapping):
        return out
    default = _limits_from_json(raw)
    if default is not None:
        out[DEFAULT_POOL] = default
    pools = raw.get("pools")
    if isinstance(pools, Mapping):
        for pool, value in pools.items():
            parsed = _limits_from_json(value)
            if parsed is not None:
                out[str(pool)] = parsed
    return out


def in_force_from_status(status: Mapping[str, Any] | None, generation: Any) -> InForce:
    """The previous round's decision, read back from ``FetchPool.status`` (level-triggered memory)."""
    status = status if isinstance(status, Mapping) else {}
    pending: Pending | None = None
    raw_pending = status.get("pending")
    if isinstance(raw_pending, Mapping):
        since = parse_time(raw_pending.get("since"))
        limits = limits_from_status(raw_pending.get("limits"))
        if since is not None and limits:
            pending = Pending(limits=limits, since=since)
    observed = status.get("observedGeneration")
    spec_changed = generation is not None and observed is not None and observed != generation
    return InForce(limits=limits_from_status(status.get("limits")), pending=pending, spec_changed=spec_changed)


def offered_from_status(status: Mapping[str, Any] | None) -> dict[str, int]:
    """Budget key -> the largest ``max_connections`` any operator may have sent a pod (``status.offered``)."""
    raw = (status or {}).get("offered") if isinstance(status, Mapping) else None
    return {key: lim.max_connections for key, lim in limits_from_status(raw).items()}


def max_surge_of(deployment: Mapping[str, Any], replicas: int) -> int:
    """Pods a rolling update of ``deployment`` may add above ``replicas`` (0 for ``Recreate``).

    An unreadable ``maxSurge`` counts as the Kubernetes default, 25 %.
    """
    strategy = (deployment.get("spec") or {}).get("strategy") or {}
    if strategy.get("type") == "Recreate":
        return 0
    raw = (strategy.get("rollingUpdate") or {}).get("maxSurge")
    try:
        return max_surge(raw, replicas)
    except ValueError:
        return max_surge(None, replicas)


def claimant(fetchpools: Sequence[Mapping[str, Any]], deployment: str) -> str | None:
    """The name of the FetchPool that divides ``deployment``'s budget: the oldest one naming it.

    Oldest by ``metadata.creationTimestamp``, then by name (the API server sets the timestamp to the
    second). Later FetchPools on the same Deployment get the ``Conflict`` condition and push nothing.
    """
    named = []
    for fp in fetchpools:
        target = (fp.get("spec") or {}).get("target")
        meta = fp.get("metadata") or {}
        if (
            isinstance(target, Mapping)
            and str(target.get("name") or "") == deployment
            and not meta.get("deletionTimestamp")
        ):
            named.append((str(meta.get("creationTimestamp") or ""), str(meta.get("name") or "")))
    return min(named)[1] if named else None


def limits_file(
    limits: Mapping[str, Limits],
    *,
    keepalive_expiry_seconds: float | None = None,
    pool_timeout_seconds: float | None = None,
) -> dict[str, Any]:
    """The service's ``--limits-file`` JSON: the start limit every pool of a new pod takes.

    One object for all pools, so it holds the smallest of ``limits``: a new pod starts within every
    pool's budget (:mod:`fetchpool.operator.budget`), and the operator raises it by RPC once ready.
    """
    smallest = min(limits.values(), key=lambda lim: (lim.max_connections, lim.max_keepalive_connections))
    keepalive = min(lim.max_keepalive_connections for lim in limits.values())
    out: dict[str, Any] = {
        "max_connections": smallest.max_connections,
        "max_keepalive_connections": min(keepalive, smallest.max_connections),
    }
    if keepalive_expiry_seconds is not None:
        out["keepalive_expiry"] = keepalive_expiry_seconds
    if pool_timeout_seconds is not None:
        out["pool_timeout"] = pool_timeout_seconds
    return out


# --- conditions ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Condition:
    """A standard condition (``metav1.Condition``), without the transition time."""

    type: str
    status: bool
    reason: str
    message: str = ""


def conditions_patch(
    previous: Sequence[Mapping[str, Any]] | None,
    conditions: Sequence[Condition],
    *,
    now: float,
    generation: Any = None,
) -> list[dict[str, Any]]:
    """The full ``status.conditions`` list; ``lastTransitionTime`` moves only when ``status`` flips."""
    old = {c.get("type"): c for c in (previous or []) if isinstance(c, Mapping)}
    out: list[dict[str, Any]] = []
    for cond in conditions:
        status = "True" if cond.status else "False"
        before = old.get(cond.type)
        changed = before is None or before.get("status") != status
        item: dict[str, Any] = {
            "type": cond.type,
            "status": status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": format_time(now)[:19] + "Z"
            if changed
            else before.get("lastTransitionTime", format_time(now)[:19] + "Z"),  # type: ignore[union-attr]
        }
        if generation is not None:
            item["observedGeneration"] = generation
        out.append(item)
    return out


def dumps(data: Any) -> str:
    """Stable JSON (sorted keys) so that unchanged content compares equal."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))
