"""The budget ledger (``fetchpool.operator.budget``): ceiling, reserve, counting, room to raise. Pure.

The rule as a whole, with the reconciler and a cluster model, is proved in
``test_operator_budget_model.py``; these are its parts.
"""

from __future__ import annotations

import pytest
from fetchpool.operator.budget import BUDGET_BELOW_MINIMUM, OVER_BUDGET, Ledger, ceiling, max_surge, water_level
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("value", "replicas", "expected"),
    [
        (None, 10, 3),  # Kubernetes' default 25 %, rounded up
        ("25%", 2, 1),
        ("0%", 10, 0),
        ("100%", 4, 4),
        (2, 10, 2),
        ("3", 10, 3),
        (0, 10, 0),
    ],
)
def test_max_surge_as_kubernetes_resolves_it(value: int | str | None, replicas: int, expected: int) -> None:
    assert max_surge(value, replicas) == expected


def test_max_surge_refuses_nonsense() -> None:
    for bad in (True, "lots", "x%"):
        with pytest.raises(ValueError):
            max_surge(bad, 3)  # type: ignore[arg-type]


def test_ceiling_is_the_scalers_most_plus_the_surge() -> None:
    assert ceiling(scaler_max=10, counts=[2, 3], surge=3) == 13
    assert ceiling(scaler_max=None, counts=[2, None], surge=1) == 3  # nobody scales: the Deployment's replicas
    assert ceiling(scaler_max=4, counts=[6], surge=0) == 6  # never below what exists (maxReplicas lowered)
    assert ceiling(scaler_max=None, counts=[None], surge=0) == 1


def test_water_level_raises_the_lowest_first() -> None:
    assert water_level([10, 10], headroom=20, cap=50) == 20
    assert water_level([5, 30], headroom=20, cap=50) == 25  # 5 -> 25 costs 20; 30 stays
    assert water_level([5, 30], headroom=100, cap=50) == 50
    assert water_level([10, 10], headroom=0, cap=50) == 10
    assert water_level([10, 10], headroom=-5, cap=50) == 10  # over budget: nobody is raised
    assert water_level([], headroom=7, cap=50) == 50


@settings(max_examples=300, deadline=None)
@given(
    current=st.lists(st.integers(0, 1000), min_size=1, max_size=20),
    headroom=st.integers(-100, 5000),
    cap=st.integers(0, 2000),
)
def test_water_level_spends_at_most_the_headroom_and_as_much_as_it_can(
    current: list[int], headroom: int, cap: int
) -> None:
    level = water_level(current, headroom, cap)
    cost = sum(max(0, level - c) for c in current)
    assert cost <= max(0, headroom)
    if level < cap and level >= min(current):
        assert sum(max(0, level + 1 - c) for c in current) > headroom  # one more would not fit


def test_the_ledger_counts_pods_and_the_reserve() -> None:
    ledger = Ledger({"*": 100}, start=2, slots=3, ceiling=5)
    ledger.hold("a", {"*": 40})
    ledger.hold("b", {"*": 30})
    assert ledger.reserved() == 6 and ledger.held("*") == 70 and ledger.total("*") == 76
    assert ledger.headroom("*") == 24
    assert ledger.available_to(["a", "b"], "*") == 94  # what the two may share: 100 - 6
    assert ledger.available_to(["a"], "*") == 64
    assert ledger.problems() == []


def test_over_budget_because_of_a_pod_that_holds_more() -> None:
    ledger = Ledger({"*": 50}, start=2, slots=1, ceiling=3)
    ledger.hold("silent", {"*": 40})
    ledger.hold("b", {"*": 20})
    (problem,) = ledger.problems()
    assert problem.reason == OVER_BUDGET
    assert problem.message == (
        "the fleet may open 62 connections, over the budget of 50: pods that have not confirmed a lower "
        "limit still count at their larger one: silent (40), b (20)"
    )


def test_over_budget_because_of_the_minimum() -> None:
    ledger = Ledger({"*": 100, "http://p:1": 10}, start=5, slots=2, ceiling=4)
    ledger.hold("a", {"*": 5, "http://p:1": 5})
    ledger.hold("b", {"*": 5, "http://p:1": 5})
    (problem,) = ledger.problems()
    assert problem.reason == BUDGET_BELOW_MINIMUM
    assert problem.message.startswith("pool 'http://p:1': connection budget 10 is below minPerReplica 5 x 4 pods")
