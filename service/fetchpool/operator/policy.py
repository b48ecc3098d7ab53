"""Per-replica pool sizing: a pure function of the spec, the observed fleet and the limits in force.

Nothing here touches Kubernetes, gRPC or a clock: dataclasses in, dataclasses out, and the caller
passes ``now``. The handlers (:mod:`fetchpool.operator.reconciler`) observe the cluster, call
:func:`decide`, deliver the result and persist it in the ``FetchPool`` status, so every decision is
recomputed from observed state (level-triggered) and is the same however often it is repeated.

Units
    *connections* are open connections of one pod's pool (``max_connections``: its sockets, what a
    proxy provider sells). The operator divides connections, not requests: over HTTP/2 one
    connection carries up to the server's max concurrent streams, and a pod caps its requests in
    flight with its own ``max_requests`` (by default 100 per connection, following the share given
    here). *seconds* are float seconds; ``now`` and ``since`` are POSIX timestamps in float seconds.

Pools
    A pod has one pool per route: ``"direct"`` and one per proxy (named as ``GetPoolLimits`` names
    them). :data:`DEFAULT_POOL` (``"*"``) stands for every pool without its own budget; a pool with
    its own budget (``spec.proxyBudgets``, e.g. one per proxy provider) is sized on its
    own.

The division
    The ledger (:mod:`fetchpool.operator.budget`) says how many connections the ready pods may share
    (``available``: the budget minus the connections kept for pods that may still start, and minus
    what every other live pod may hold) and how many ready pods share them. This module only decides
    what one ready replica should get from that: it never sees a pod.

Modes
    ``budget``: ``per_replica = floor(available / ready)`` (floor, so rounding never exceeds the
    budget), clamped to ``[minPerReplica, maxPerReplica]``.

    ``formula``: the seed's pool-size formula ``pool_size = concurrency * (1 + latency /
    processing_time)`` (a worker that holds a connection ``latency`` seconds for every
    ``processing_time`` seconds of its own work needs ``1 + latency / processing_time`` connections
    to stay busy; this is the "N_threads = N_cpu * (1 + W / C)" sizing rule), rounded up, then capped
    by the budget share and clamped like ``budget``. ``concurrency`` is the spec's value or, when the
    spec leaves it out, the pods' measured demand per replica (in-flight + queued requests, the
    ``requests_active + requests_waiting`` of ``GetPoolStats``; the same quantity as the service's
    ``fetchpool_demand_requests`` metric).

    A share below ``minPerReplica`` is raised to it: whether the fleet then exceeds the budget is the
    ledger's to count and report.

Hysteresis
    A change the budget requires (the limit in force exceeds what the budget now allows) applies at
    once. Every other change - growth, or in ``formula`` mode a shrink because demand fell - waits
    until it has been pending for ``stabilization_seconds`` without being cancelled (like the HPA's
    own scale-down stabilization window). A flapping HPA (3 -> 6 -> 3 -> 6 ...) therefore shrinks
    once and never thrashes back up within the window. A spec change (new ``metadata.generation``)
    skips the wait. Whether a due growth can be given to a pod now is again the ledger's question.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "DEFAULT_POOL",
    "FORMULA_INPUTS_UNAVAILABLE",
    "MAX_CONNECTIONS_CEILING",
    "Decision",
    "FleetObservation",
    "FormulaInputs",
    "InForce",
    "Limits",
    "Mode",
    "Pending",
    "Problem",
    "SizingSpec",
    "decide",
    "formula_pool_size",
    "per_replica_limit",
    "validate",
]

#: The key of the limits that apply to every pool without its own budget.
DEFAULT_POOL = "*"

#: fetchpool refuses larger ``max_connections`` as a typo (``fetchpool.config.MAX_CONNECTIONS_CEILING``).
MAX_CONNECTIONS_CEILING = 100_000

#: Problem reason (a ``Degraded`` condition reason).
FORMULA_INPUTS_UNAVAILABLE = "FormulaInputsUnavailable"


class Mode(StrEnum):
    """How the per-replica limit is chosen."""

    BUDGET = "budget"
    FORMULA = "formula"


@dataclass(frozen=True, kw_only=True, slots=True)
class FormulaInputs:
    """Inputs of ``pool_size = concurrency * (1 + latency / processing_time)``, per replica.

    - ``concurrency``: workers (requests) per replica; ``None`` means "use the measured demand".
    - ``latency_seconds``: time a request holds a connection waiting on the network, seconds.
    - ``processing_time_seconds``: time spent on a response outside the connection, seconds (> 0).
    """

    concurrency: float | None = None
    latency_seconds: float
    processing_time_seconds: float


@dataclass(frozen=True, kw_only=True, slots=True)
class SizingSpec:
    """What the ``FetchPool`` spec asks for (all counts are connections; see the module docstring).

    - ``connection_budget``: connections across all replicas, for each pool without its own budget.
    - ``pool_budgets``: pool name -> connections across all replicas for that pool (e.g. per proxy).
    - ``min_per_replica`` / ``max_per_replica``: clamps of the per-replica limit (``None``: no max).
    - ``keepalive_share``: fraction of a replica's connections kept open while idle, 0..1.
    - ``stabilization_seconds``: how long a non-urgent change must persist before it applies.
    """

    connection_budget: int
    pool_budgets: Mapping[str, int] = field(default_factory=dict)
    min_per_replica: int = 1
    max_per_replica: int | None = None
    keepalive_share: float = 0.5
    mode: Mode = Mode.BUDGET
    formula: FormulaInputs | None = None
    stabilization_seconds: float = 30.0

    def budgets(self) -> dict[str, int]:
        """Pool -> fleet budget, with :data:`DEFAULT_POOL` for every other pool."""
        return {DEFAULT_POOL: self.connection_budget, **dict(self.pool_budgets)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Per-replica limits of one pool: connections, and idle connections kept (<= connections)."""

    max_connections: int
    max_keepalive_connections: int


@dataclass(frozen=True, kw_only=True, slots=True)
class FleetObservation:
    """What the ready replicas share, from the ledger (:mod:`fetchpool.operator.budget`).

    - ``available``: pool -> connections the ready replicas may share (may be negative).
    - ``ready``: ready replicas sharing them (the divisor; at least 1 is used).
    - ``demand_per_replica``: pool -> mean in-flight + queued requests per replica (formula mode);
      :data:`DEFAULT_POOL` holds the mean over all pools of a replica.
    """

    available: Mapping[str, int]
    ready: int = 1
    demand_per_replica: Mapping[str, float] = field(default_factory=dict)

    @property
    def dividers(self) -> int:
        return max(1, self.ready)


@dataclass(frozen=True, kw_only=True, slots=True)
class Pending:
    """A deferred change: the limits it would apply and since when (POSIX seconds) it has waited."""

    limits: Mapping[str, Limits]
    since: float


@dataclass(frozen=True, kw_only=True, slots=True)
class InForce:
    """What the previous round left in force (read back from the ``FetchPool`` status).

    - ``limits``: pool -> per-replica limits decided last; empty when nothing was decided yet.
    - ``pending``: the deferred change, if any.
    - ``spec_changed``: the spec changed since the previous round (skip the stabilization wait).
    """

    limits: Mapping[str, Limits] = field(default_factory=dict)
    pending: Pending | None = None
    spec_changed: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Problem:
    """Why the result is not what the spec wants: a condition ``reason`` and an exact ``message``."""

    reason: str
    message: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    """The outcome of one round.

    - ``target``: pool -> per-replica limits the spec and the observation ask for now (before hysteresis).
    - ``limits``: pool -> per-replica limits to put in force now (the ledger decides how far).
    - ``pending``: the change still deferred (``target`` differs from ``limits``), or ``None``.
    - ``problems``: reasons for ``Degraded``; empty when healthy.
    """

    target: Mapping[str, Limits]
    limits: Mapping[str, Limits]
    pending: Pending | None
    problems: tuple[Problem, ...] = ()


def validate(spec: SizingSpec) -> list[str]:
    """Every problem of ``spec`` as an exact sentence naming the field; empty when valid."""
    problems: list[str] = []
    if spec.connection_budget < 1:
        problems.append(f"spec.connectionBudget must be >= 1 connection, got {spec.connection_budget}")
    for pool, budget in sorted(spec.pool_budgets.items()):
        if budget < 1:
            problems.append(f"spec.proxyBudgets[{pool!r}] must be >= 1 connection, got {budget}")
    if spec.min_per_replica < 1:
        problems.append(f"spec.minPerReplica must be >= 1 connection, got {spec.min_per_replica}")
    if spec.max_per_replica is not None:
        if spec.max_per_replica < 1:
            problems.append(f"spec.maxPerReplica must be >= 1 connection, got {spec.max_per_replica}")
        elif spec.max_per_replica < spec.min_per_replica:
            problems.append(
                f"spec.maxPerReplica ({spec.max_per_replica}) must be >= spec.minPerReplica ({spec.min_per_replica})"
            )
        if spec.max_per_replica > MAX_CONNECTIONS_CEILING:
            problems.append(f"spec.maxPerReplica must be <= {MAX_CONNECTIONS_CEILING}, got {spec.max_per_replica}")
    if spec.min_per_replica > MAX_CONNECTIONS_CEILING:
        problems.append(f"spec.minPerReplica must be <= {MAX_CONNECTIONS_CEILING}, got {spec.min_per_replica}")
    if not (math.isfinite(spec.keepalive_share) and 0.0 <= spec.keepalive_share <= 1.0):
        problems.append(f"spec.keepaliveShare must be between 0 and 1, got {spec.keepalive_share}")
    if not (math.isfinite(spec.stabilization_seconds) and spec.stabilization_seconds >= 0):
        problems.append(f"spec.stabilizationSeconds must be >= 0 seconds, got {spec.stabilization_seconds}")
    if spec.mode is Mode.FORMULA:
        f = spec.formula
        if f is None:
            problems.append("spec.formula is required when spec.mode is 'formula'")
        else:
            if f.concurrency is not None and not (math.isfinite(f.concurrency) and f.concurrency >= 0):
                problems.append(f"spec.formula.concurrency must be >= 0, got {f.concurrency}")
            if not (math.isfinite(f.latency_seconds) and f.latency_seconds >= 0):
                problems.append(f"spec.formula.latencySeconds must be >= 0 seconds, got {f.latency_seconds}")
            if not (math.isfinite(f.processing_time_seconds) and f.processing_time_seconds > 0):
                problems.append(
                    f"spec.formula.processingTimeSeconds must be > 0 seconds, got {f.processing_time_seconds}"
                )
    return problems


def formula_pool_size(concurrency: float, latency_seconds: float, processing_time_seconds: float) -> int:
    """``ceil(concurrency * (1 + latency / processing_time))``: connections one replica needs."""
    if processing_time_seconds <= 0:
        raise ValueError(f"processing_time_seconds must be > 0, got {processing_time_seconds}")
    # Round first so that float noise (3 * 1.2 = 3.5999...96) does not add a connection.
    return math.ceil(round(concurrency * (1.0 + latency_seconds / processing_time_seconds), 9))


def per_replica_limit(
    spec: SizingSpec, *, available: int, ready: int, demand: float | None = None
) -> tuple[int, list[Problem]]:
    """The per-replica ``max_connections`` of one pool, before hysteresis.

    ``available`` connections are shared by ``ready`` (>= 1) replicas. Returns the limit and the
    problems found (:data:`FORMULA_INPUTS_UNAVAILABLE` when formula mode has no concurrency and no
    measurement and falls back to the budget share).
    """
    problems: list[Problem] = []
    share = available // ready  # floor: share * ready <= available
    want = share
    if spec.mode is Mode.FORMULA and spec.formula is not None:
        concurrency = spec.formula.concurrency if spec.formula.concurrency is not None else demand
        if concurrency is None:
            problems.append(
                Problem(
                    reason=FORMULA_INPUTS_UNAVAILABLE,
                    message="spec.formula.concurrency is unset and no pod reported its demand "
                    "(GetPoolStats requests_active + requests_waiting); using the budget share",
                )
            )
        else:
            want = min(
                share,
                formula_pool_size(concurrency, spec.formula.latency_seconds, spec.formula.processing_time_seconds),
            )
    return _clamp(spec, want), problems


def _clamp(spec: SizingSpec, limit: int) -> int:
    if spec.max_per_replica is not None:
        limit = min(limit, spec.max_per_replica)
    return max(min(limit, MAX_CONNECTIONS_CEILING), spec.min_per_replica)


def _limits(spec: SizingSpec, max_connections: int) -> Limits:
    keepalive = min(max_connections, math.floor(max_connections * spec.keepalive_share + 1e-9))
    return Limits(max_connections=max_connections, max_keepalive_connections=keepalive)


def _cap(spec: SizingSpec, available: int, ready: int) -> int:
    """The largest per-replica limit the budget and the clamps allow now."""
    return _clamp(spec, available // ready)


def decide(spec: SizingSpec, observed: FleetObservation, in_force: InForce, *, now: float) -> Decision:
    """One round of sizing: the per-replica target, what to put in force now, and what stays deferred.

    ``spec`` must be valid (:func:`validate` returned nothing). See the module docstring for the
    rules; in short: budget-required shrinks apply now, other changes wait ``stabilization_seconds``.
    """
    n = observed.dividers
    budgets = spec.budgets()
    target: dict[str, Limits] = {}
    problems: list[Problem] = []
    for pool in budgets:
        demand = observed.demand_per_replica.get(pool, observed.demand_per_replica.get(DEFAULT_POOL))
        available = observed.available.get(pool, budgets[pool])
        limit, found = per_replica_limit(spec, available=available, ready=n, demand=demand)
        target[pool] = _limits(spec, limit)
        for problem in found:
            message = problem.message if pool == DEFAULT_POOL else f"pool {pool!r}: {problem.message}"
            problems.append(Problem(reason=problem.reason, message=message))

    previous = in_force.limits
    immediate: dict[str, Limits] = {}
    deferred: dict[str, Limits] = {}
    for pool, want in target.items():
        had = previous.get(pool)
        if had is None or had.max_connections == want.max_connections:
            immediate[pool] = want  # first application, or only the keep-alive share changed
        elif want.max_connections < had.max_connections and (
            had.max_connections > _cap(spec, observed.available.get(pool, budgets[pool]), n) or spec.mode is Mode.BUDGET
        ):
            immediate[pool] = want  # the budget (or a clamp) requires the shrink: now
        elif in_force.spec_changed:
            immediate[pool] = want  # a new spec is applied without the stabilization wait
        else:
            deferred[pool] = want

    pending: Pending | None = None
    limits = dict(immediate)
    if deferred:
        since = in_force.pending.since if in_force.pending is not None else now
        if now - since >= spec.stabilization_seconds:
            limits.update(deferred)
        else:
            limits.update({pool: previous[pool] for pool in deferred})
            pending = Pending(limits={**limits, **deferred}, since=since)
    return Decision(target=target, limits=limits, pending=pending, problems=tuple(problems))
