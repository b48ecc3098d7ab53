"""The budget ledger: what the fleet may hold at every moment, and how much may be given out now.

Pure (no Kubernetes, no gRPC, no clock). The reconciler fills a :class:`Ledger` each round from what
it observed and uses it to decide what it may send; the rule it implements is the one the README
states ("The budget at every moment"):

The rule
    - **Start limit.** A pod that has not heard from the operator holds ``minPerReplica``
      connections per pool: the limits ConfigMap (``limits.json``) holds it, and the chart also sets
      ``FETCHPOOL_MAX_CONNECTIONS`` to it for pods that start before the first ConfigMap exists.
    - **Ceiling.** ``C`` = the most pods the scaler may run - the HPA's ``maxReplicas`` (KEDA's HPA
      included), or the Deployment's ``replicas`` when nothing scales it - plus the Deployment's
      ``maxSurge`` (a rolling update's extra pods), and never less than the pods that exist.
    - **Reserve.** ``minPerReplica`` is kept for every pod that may still start without the
      operator's word: ``C`` minus the pods that exist and are not terminating.
    - **Counting.** Every live pod (pending, running or terminating) counts at what it may hold: the
      limit it confirmed (``GetPoolLimits`` / ``SetPoolLimits``), raised by any larger limit sent to
      it that it did not confirm ("the larger of old and new"). A pod never confirmed counts at the
      start limit while it has not started, and at the largest limit ever offered once it runs (an
      earlier operator may have raised it: ``status.offered`` is written before any raise is sent).
    - **Raising.** A pod is raised only while reserve + everything counted, the raise included,
      stays within the budget. Lowering is always allowed, and is sent first.

Why it holds with no operator running: a pod that starts takes a reserved slot at the start limit,
and a pod that goes away frees at least that much, so the fleet stays within the budget as long as
no more than ``C`` pods exist at once. What can break it, stated in the README: a ceiling raised
(``maxReplicas`` edited, ``kubectl scale`` above it) or pods replaced while still terminating (a
scale-up right after a scale-down, a rolling update) *while the operator is not running*: each pod
beyond ``C`` adds at most ``minPerReplica`` until the operator's next round; the operator counts
terminating pods and reserves their replacements' slots as soon as it sees them.

Units: connections per pool; a *key* is a budget key (:data:`~fetchpool.operator.policy.DEFAULT_POOL`
or a pool named in ``spec.proxyBudgets``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from fetchpool.operator.policy import DEFAULT_POOL, Problem

__all__ = [
    "BUDGET_BELOW_MINIMUM",
    "OVER_BUDGET",
    "Ledger",
    "ceiling",
    "max_surge",
    "water_level",
]

#: Degraded reasons: the minimum per replica alone exceeds the budget; pods hold more than it allows.
BUDGET_BELOW_MINIMUM = "BudgetBelowMinimum"
OVER_BUDGET = "OverBudget"


def max_surge(value: int | str | None, replicas: int) -> int:
    """Pods a rolling update may add above ``replicas``: an int, or a percentage rounded up.

    ``None`` is the Kubernetes default, 25 %. Raises ValueError for anything else.
    """
    if value is None:
        value = "25%"
    if isinstance(value, bool):
        raise ValueError(f"maxSurge must be an integer or a percentage, got {value!r}")
    if isinstance(value, int):
        return max(0, value)
    text = str(value).strip()
    if not text.endswith("%"):
        return max(0, int(text))
    return max(0, math.ceil(replicas * int(text[:-1]) / 100))


def ceiling(*, scaler_max: int | None, counts: Iterable[int | None], surge: int) -> int:
    """``C``: the scaler's most replicas (``None``: nothing scales, the largest count is it), never
    below any observed count, plus ``surge``; at least 1."""
    base = max([1, *(c for c in counts if c is not None), *([scaler_max] if scaler_max is not None else [])])
    return base + max(0, surge)


def water_level(current: Iterable[int], headroom: int, cap: int) -> int:
    """The highest level ``g <= cap`` such that raising every value below ``g`` to ``g`` costs at
    most ``headroom`` connections (values at or above ``g`` stay). ``headroom <= 0`` raises nobody."""
    values = sorted(current)
    if not values:
        return cap
    low, high = values[0], max(values[0], cap)
    while low < high:
        mid = (low + high + 1) // 2
        if sum(max(0, mid - v) for v in values) <= headroom:
            low = mid
        else:
            high = mid - 1
    return low


class Ledger:
    """One round's count of the fleet: budgets, reserve and what every live pod may hold.

    - ``budgets``: key -> fleet budget (connections).
    - ``start``: the start limit (``minPerReplica``; the largest the limits file may give a pod).
    - ``slots``: pods that may still start without the operator's word (``C`` - pods not terminating).
    """

    def __init__(self, budgets: Mapping[str, int], *, start: int, slots: int, ceiling: int) -> None:
        self.budgets = dict(budgets)
        self.start = start
        self.slots = max(0, slots)
        self.ceiling = ceiling
        self._pods: dict[str, dict[str, int]] = {}

    def hold(self, pod: str, counted: Mapping[str, int]) -> None:
        """Record what ``pod`` may hold now (a missing key counts at the start limit)."""
        self._pods[pod] = dict(counted)

    def counted(self, pod: str, key: str) -> int:
        """What ``pod`` counts at on ``key``."""
        return self._pods[pod].get(key, self.start)

    def reserved(self) -> int:
        """Connections kept per key for pods that may still start."""
        return self.slots * self.start

    def held(self, key: str) -> int:
        """Sum over live pods of what each may hold on ``key`` (the contract's ``limit_sum``)."""
        return sum(self.counted(pod, key) for pod in self._pods)

    def total(self, key: str) -> int:
        """What the fleet may open on ``key``: everything held plus the reserve."""
        return self.held(key) + self.reserved()

    def headroom(self, key: str) -> int:
        """Connections on ``key`` that may still be given out (negative when over budget)."""
        return self.budgets[key] - self.total(key)

    def available_to(self, pods: Iterable[str], key: str) -> int:
        """What ``pods`` may share on ``key``: the budget minus the reserve and every other pod's count."""
        group = set(pods)
        others = sum(self.counted(pod, key) for pod in self._pods if pod not in group)
        return self.budgets[key] - self.reserved() - others

    def problems(self) -> list[Problem]:
        """Why the fleet may open more than a budget: the minimum alone, or pods holding more."""
        found: list[Problem] = []
        for key, budget in sorted(self.budgets.items()):
            total = self.total(key)
            if total <= budget:
                continue
            label = "" if key == DEFAULT_POOL else f"pool {key!r}: "
            floor = self.start * (len(self._pods) + self.slots)
            if floor > budget:
                found.append(
                    Problem(
                        reason=BUDGET_BELOW_MINIMUM,
                        message=f"{label}connection budget {budget} is below minPerReplica {self.start} x "
                        f"{len(self._pods) + self.slots} pods (ceiling {self.ceiling} plus terminating "
                        f"pods) = {floor}: the fleet may open {total} connections",
                    )
                )
                continue
            holders = sorted(
                (pod for pod in self._pods if self.counted(pod, key) > self.start),
                key=lambda pod: (-self.counted(pod, key), pod),
            )
            named = ", ".join(f"{pod} ({self.counted(pod, key)})" for pod in holders[:5])
            found.append(
                Problem(
                    reason=OVER_BUDGET,
                    message=f"{label}the fleet may open {total} connections, over the budget of {budget}: "
                    f"pods that have not confirmed a lower limit still count at their larger one: {named}",
                )
            )
        return found
