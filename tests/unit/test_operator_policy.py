"""The operator's sizing policy (``fetchpool.operator.policy``): pure, no cluster, no clock."""

from __future__ import annotations

import math

import pytest
from fetchpool.operator.policy import (
    BUDGET_BELOW_MINIMUM,
    DEFAULT_POOL,
    FORMULA_INPUTS_UNAVAILABLE,
    FleetObservation,
    FormulaInputs,
    InForce,
    Limits,
    Mode,
    Pending,
    SizingSpec,
    decide,
    formula_pool_size,
    holders,
    per_replica_limit,
    validate,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def lim(n: int, keep: int | None = None) -> Limits:
    return Limits(max_connections=n, max_keepalive_connections=n // 2 if keep is None else keep)


def obs(current: int | None = None, desired: int | None = None, pods: int = 0, **kw: object) -> FleetObservation:
    return FleetObservation(hpa_current=current, hpa_desired=desired, live_pods=pods, **kw)  # type: ignore[arg-type]


class TestBudgetDivision:
    def test_divides_the_budget_by_the_holders(self) -> None:
        d = decide(SizingSpec(connection_budget=600), obs(6, 6, 6), InForce(), now=0)
        assert d.limits[DEFAULT_POOL] == Limits(max_connections=100, max_keepalive_connections=50)
        assert d.holders == 6 and d.fleet_connections() == 600 and not d.problems

    def test_rounds_down_so_the_fleet_never_exceeds_the_budget(self) -> None:
        d = decide(SizingSpec(connection_budget=100), obs(3, 3, 3), InForce(), now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 33
        assert d.fleet_connections() == 99 <= 100

    @pytest.mark.parametrize(
        ("observation", "expected"),
        [
            (obs(current=2, desired=6, pods=2), 6),  # scale-up decided, pods not there yet
            (obs(current=6, desired=3, pods=6), 6),  # scale-down decided, pods still there
            (obs(current=3, desired=3, pods=5), 5),  # two pods still terminating
            (FleetObservation(deployment_replicas=8, hpa_current=2, hpa_desired=2, live_pods=2), 8),
            (FleetObservation(deployment_status_replicas=4), 4),
            (FleetObservation(), 1),  # nothing known: at least one
        ],
    )
    def test_holders_is_the_largest_count(self, observation: FleetObservation, expected: int) -> None:
        assert holders(observation) == expected

    def test_max_per_replica_caps(self) -> None:
        d = decide(SizingSpec(connection_budget=600, max_per_replica=80), obs(2, 2, 2), InForce(), now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 80 and not d.problems

    def test_min_per_replica_raises_when_the_budget_allows(self) -> None:
        spec = SizingSpec(
            connection_budget=600,
            min_per_replica=10,
            mode=Mode.FORMULA,
            formula=FormulaInputs(concurrency=1, latency_seconds=0, processing_time_seconds=1),
        )
        d = decide(spec, obs(3, 3, 3), InForce(), now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 10 and not d.problems

    def test_min_per_replica_forcing_the_fleet_over_budget_is_degraded(self) -> None:
        d = decide(SizingSpec(connection_budget=50, min_per_replica=10), obs(6, 6, 6), InForce(), now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 10
        assert [p.reason for p in d.problems] == [BUDGET_BELOW_MINIMUM]
        assert d.problems[0].message == (
            "connection budget 50 is below 6 replicas x minPerReplica 10 = 60: each replica gets "
            "minPerReplica, the fleet may open 60 connections (10 over budget)"
        )

    def test_keepalive_share(self) -> None:
        d = decide(SizingSpec(connection_budget=100, keepalive_share=0.25), obs(1, 1, 1), InForce(), now=0)
        assert d.limits[DEFAULT_POOL] == Limits(max_connections=100, max_keepalive_connections=25)
        d = decide(SizingSpec(connection_budget=100, keepalive_share=1.0), obs(3, 3, 3), InForce(), now=0)
        assert d.limits[DEFAULT_POOL] == Limits(max_connections=33, max_keepalive_connections=33)

    def test_proxy_budgets_are_sized_separately(self) -> None:
        spec = SizingSpec(connection_budget=600, pool_budgets={"http://proxy-a:3128": 60})
        d = decide(spec, obs(4, 4, 4), InForce(), now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 150
        assert d.limits["http://proxy-a:3128"].max_connections == 15


class TestFormula:
    def test_the_seed_formula(self) -> None:
        # concurrency * (1 + latency / processing_time) = 10 * (1 + 0.2 / 0.05) = 50
        assert formula_pool_size(10, 0.2, 0.05) == 50
        assert formula_pool_size(3, 0.2, 1.0) == 4  # 3.6 rounds up, not 3.5999...+1
        assert formula_pool_size(0, 5, 1) == 0
        with pytest.raises(ValueError):
            formula_pool_size(1, 1, 0)

    def test_capped_by_the_budget_share(self) -> None:
        spec = SizingSpec(
            connection_budget=120,
            mode=Mode.FORMULA,
            formula=FormulaInputs(concurrency=10, latency_seconds=0.2, processing_time_seconds=0.05),
        )
        assert decide(spec, obs(2, 2, 2), InForce(), now=0).limits[DEFAULT_POOL].max_connections == 50
        assert decide(spec, obs(4, 4, 4), InForce(), now=0).limits[DEFAULT_POOL].max_connections == 30

    def test_measured_demand_when_concurrency_is_unset(self) -> None:
        spec = SizingSpec(
            connection_budget=1000,
            mode=Mode.FORMULA,
            formula=FormulaInputs(latency_seconds=0.1, processing_time_seconds=0.1),
        )
        d = decide(spec, obs(2, 2, 2, demand_per_replica={DEFAULT_POOL: 7.0}), InForce(), now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 14 and not d.problems

    def test_no_measurement_falls_back_to_the_share(self) -> None:
        spec = SizingSpec(
            connection_budget=100,
            mode=Mode.FORMULA,
            formula=FormulaInputs(latency_seconds=0.1, processing_time_seconds=0.1),
        )
        d = decide(spec, obs(2, 2, 2), InForce(), now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 50
        assert [p.reason for p in d.problems] == [FORMULA_INPUTS_UNAVAILABLE]


class TestHysteresis:
    spec = SizingSpec(connection_budget=60, stabilization_seconds=10)

    def test_scale_up_shrinks_at_once(self) -> None:
        d = decide(self.spec, obs(2, 6, 2), InForce(limits={DEFAULT_POOL: lim(30, 15)}), now=100)
        assert d.limits[DEFAULT_POOL].max_connections == 10 and d.pending is None

    def test_scale_down_grows_only_after_the_window(self) -> None:
        before = InForce(limits={DEFAULT_POOL: lim(10, 5)})
        d1 = decide(self.spec, obs(3, 3, 3), before, now=100)
        assert d1.limits[DEFAULT_POOL].max_connections == 10
        assert d1.pending == Pending(limits={DEFAULT_POOL: lim(20, 10)}, since=100)
        d2 = decide(self.spec, obs(3, 3, 3), InForce(limits=d1.limits, pending=d1.pending), now=109.9)
        assert d2.limits[DEFAULT_POOL].max_connections == 10 and d2.pending is not None
        d3 = decide(self.spec, obs(3, 3, 3), InForce(limits=d2.limits, pending=d2.pending), now=110)
        assert d3.limits[DEFAULT_POOL].max_connections == 20 and d3.pending is None

    def test_flapping_hpa_does_not_thrash(self) -> None:
        state = InForce(limits={DEFAULT_POOL: lim(10, 5)})
        seen = []
        for step, replicas in enumerate([3, 6, 3, 6, 3, 6, 3, 6]):
            d = decide(self.spec, obs(replicas, replicas, replicas), state, now=100 + 4 * step)
            seen.append(d.limits[DEFAULT_POOL].max_connections)
            state = InForce(limits=d.limits, pending=d.pending)
        assert seen == [10] * 8

    def test_growth_waits_for_every_pod_to_confirm(self) -> None:
        state = InForce(
            limits={DEFAULT_POOL: lim(10, 5)},
            pending=Pending(limits={DEFAULT_POOL: lim(20)}, since=0),
            all_confirmed=False,
        )
        d = decide(self.spec, obs(3, 3, 3), state, now=100)
        assert d.limits[DEFAULT_POOL].max_connections == 10 and d.pending is not None
        assert d.growth_blocked_by_unconfirmed(state)

    def test_a_new_spec_skips_the_window(self) -> None:
        state = InForce(limits={DEFAULT_POOL: lim(10, 5)}, spec_changed=True)
        assert decide(self.spec, obs(3, 3, 3), state, now=100).limits[DEFAULT_POOL].max_connections == 20

    def test_formula_demand_dip_is_deferred(self) -> None:
        spec = SizingSpec(
            connection_budget=600,
            mode=Mode.FORMULA,
            stabilization_seconds=10,
            formula=FormulaInputs(latency_seconds=1, processing_time_seconds=1),
        )
        state = InForce(limits={DEFAULT_POOL: lim(40, 20)})
        d = decide(spec, obs(2, 2, 2, demand_per_replica={DEFAULT_POOL: 5}), state, now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 40 and d.pending is not None
        # ... but a shrink the budget needs is immediate even in formula mode:
        d = decide(spec, obs(20, 20, 20, demand_per_replica={DEFAULT_POOL: 50}), state, now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 30


class TestValidate:
    def test_valid(self) -> None:
        assert validate(SizingSpec(connection_budget=1)) == []

    def test_every_problem_is_named(self) -> None:
        problems = validate(
            SizingSpec(
                connection_budget=-5,
                min_per_replica=0,
                max_per_replica=-1,
                keepalive_share=1.5,
                pool_budgets={"p": 0},
                stabilization_seconds=-1,
            )
        )
        assert problems == [
            "spec.connectionBudget must be >= 1 connection, got -5",
            "spec.proxyBudgets['p'] must be >= 1 connection, got 0",
            "spec.minPerReplica must be >= 1 connection, got 0",
            "spec.maxPerReplica must be >= 1 connection, got -1",
            "spec.keepaliveShare must be between 0 and 1, got 1.5",
            "spec.stabilizationSeconds must be >= 0 seconds, got -1",
        ]

    def test_min_above_max(self) -> None:
        assert validate(SizingSpec(connection_budget=10, min_per_replica=5, max_per_replica=4)) == [
            "spec.maxPerReplica (4) must be >= spec.minPerReplica (5)"
        ]

    def test_formula_needs_inputs(self) -> None:
        assert validate(SizingSpec(connection_budget=10, mode=Mode.FORMULA)) == [
            "spec.formula is required when spec.mode is 'formula'"
        ]


# --- properties -----------------------------------------------------------------------------------

counts = st.one_of(st.none(), st.integers(min_value=0, max_value=500))


@st.composite
def specs(draw: st.DrawFn) -> SizingSpec:
    budget = draw(st.integers(min_value=1, max_value=100_000))
    min_per = draw(st.integers(min_value=1, max_value=2_000))
    max_per = draw(st.one_of(st.none(), st.integers(min_value=min_per, max_value=100_000)))
    mode = draw(st.sampled_from(Mode))
    formula = None
    if mode is Mode.FORMULA:
        formula = FormulaInputs(
            concurrency=draw(st.one_of(st.none(), st.floats(min_value=0, max_value=1e4))),
            latency_seconds=draw(st.floats(min_value=0, max_value=60)),
            processing_time_seconds=draw(st.floats(min_value=1e-3, max_value=60)),
        )
    pools = draw(
        st.dictionaries(
            st.sampled_from(["http://a:1", "http://b:2"]), st.integers(min_value=1, max_value=10_000), max_size=2
        )
    )
    return SizingSpec(
        connection_budget=budget,
        pool_budgets=pools,
        min_per_replica=min_per,
        max_per_replica=max_per,
        keepalive_share=draw(st.floats(min_value=0, max_value=1)),
        mode=mode,
        formula=formula,
        stabilization_seconds=draw(st.floats(min_value=0, max_value=600)),
    )


@st.composite
def previous(draw: st.DrawFn) -> InForce:
    pools = draw(
        st.dictionaries(
            st.sampled_from([DEFAULT_POOL, "http://a:1", "http://b:2"]),
            st.integers(min_value=1, max_value=100_000),
            max_size=3,
        )
    )
    limits = {p: Limits(max_connections=n, max_keepalive_connections=n // 2) for p, n in pools.items()}
    pending = None
    if draw(st.booleans()):
        n = draw(st.integers(min_value=1, max_value=100_000))
        pending = Pending(limits={DEFAULT_POOL: lim(n)}, since=draw(st.floats(min_value=0, max_value=2_000)))
    return InForce(limits=limits, pending=pending, all_confirmed=draw(st.booleans()), spec_changed=draw(st.booleans()))


observations = st.builds(
    FleetObservation,
    hpa_current=counts,
    hpa_desired=counts,
    deployment_replicas=counts,
    deployment_status_replicas=counts,
    live_pods=st.integers(min_value=0, max_value=500),
    demand_per_replica=st.dictionaries(
        st.sampled_from([DEFAULT_POOL, "http://a:1"]), st.floats(min_value=0, max_value=1e4), max_size=2
    ),
)


@settings(max_examples=500, deadline=None)
@given(spec=specs(), observed=observations, before=previous(), now=st.floats(min_value=0, max_value=2_000))
def test_never_over_budget_unless_min_forces_it_and_then_degraded(
    spec: SizingSpec, observed: FleetObservation, before: InForce, now: float
) -> None:
    """For any budget, replicas, clamps and previous state: sum of limits <= budget, or Degraded says why."""
    d = decide(spec, observed, before, now=now)
    n = holders(observed)
    assert d.holders == n
    for pool, budget in spec.budgets().items():
        for limits in (d.limits[pool], d.target[pool]):
            assert limits.max_connections >= 1
            assert 0 <= limits.max_keepalive_connections <= limits.max_connections
            if spec.max_per_replica is not None:
                assert limits.max_connections <= max(
                    spec.max_per_replica, before.limits.get(pool, limits).max_connections
                )
            if limits.max_connections * n > budget:
                forced = spec.min_per_replica * n > budget
                label = f"pool {pool!r}: " if pool != DEFAULT_POOL else ""
                assert forced, (pool, limits, n, budget)
                assert any(
                    p.reason == BUDGET_BELOW_MINIMUM and p.message.startswith(label + "connection budget")
                    for p in d.problems
                )
        assert d.target[pool].max_connections >= spec.min_per_replica


@settings(max_examples=300, deadline=None)
@given(
    budget=st.integers(min_value=1, max_value=1_000_000),
    n=st.integers(min_value=1, max_value=10_000),
    min_per=st.integers(min_value=1, max_value=100),
    max_per=st.one_of(st.none(), st.integers(100, 100_000)),
)
def test_budget_division_is_the_largest_fair_share(budget: int, n: int, min_per: int, max_per: int | None) -> None:
    spec = SizingSpec(connection_budget=budget, min_per_replica=min_per, max_per_replica=max_per)
    limit, problems = per_replica_limit(spec, budget=budget, holders=n)
    if min_per * n <= budget:
        assert limit * n <= budget and not problems
        ceiling = budget // n if max_per is None else min(budget // n, max_per)
        assert limit == min(max(ceiling, min_per), 100_000)  # one more each would break the budget or a clamp
    else:
        assert limit == min_per and [p.reason for p in problems] == [BUDGET_BELOW_MINIMUM]
    assert math.isfinite(limit)
