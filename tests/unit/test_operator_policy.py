"""The operator's per-replica sizing (``fetchpool.operator.policy``): pure, no cluster, no clock.

The ledger (``test_operator_budget.py``) says what the ready replicas share; this only divides it."""

from __future__ import annotations

import math

import pytest
from fetchpool.operator.policy import (
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
    per_replica_limit,
    validate,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def lim(n: int, keep: int | None = None) -> Limits:
    return Limits(max_connections=n, max_keepalive_connections=n // 2 if keep is None else keep)


def obs(available: int, ready: int, **kw: object) -> FleetObservation:
    """``available`` connections (on every pool) shared by ``ready`` replicas."""
    return FleetObservation(available={DEFAULT_POOL: available}, ready=ready, **kw)  # type: ignore[arg-type]


class TestBudgetDivision:
    def test_divides_what_is_available_by_the_ready_replicas(self) -> None:
        d = decide(SizingSpec(connection_budget=600), obs(600, 6), InForce(), now=0)
        assert d.limits[DEFAULT_POOL] == Limits(max_connections=100, max_keepalive_connections=50)
        assert not d.problems and d.pending is None

    def test_rounds_down_so_the_fleet_never_exceeds_the_budget(self) -> None:
        d = decide(SizingSpec(connection_budget=100), obs(100, 3), InForce(), now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 33

    def test_no_ready_replica_divides_by_one(self) -> None:
        assert (
            decide(SizingSpec(connection_budget=100), obs(90, 0), InForce(), now=0).limits[DEFAULT_POOL].max_connections
            == 90
        )

    def test_a_pool_the_ledger_says_nothing_about_gets_its_whole_budget(self) -> None:
        spec = SizingSpec(connection_budget=100, pool_budgets={"http://a:1": 40})
        d = decide(spec, obs(50, 2), InForce(), now=0)
        assert d.limits["http://a:1"].max_connections == 20 and d.limits[DEFAULT_POOL].max_connections == 25

    def test_max_per_replica_caps(self) -> None:
        d = decide(SizingSpec(connection_budget=600, max_per_replica=80), obs(600, 2), InForce(), now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 80 and not d.problems

    def test_min_per_replica_raises_when_the_budget_allows(self) -> None:
        spec = SizingSpec(
            connection_budget=600,
            min_per_replica=10,
            mode=Mode.FORMULA,
            formula=FormulaInputs(concurrency=1, latency_seconds=0, processing_time_seconds=1),
        )
        d = decide(spec, obs(600, 3), InForce(), now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 10 and not d.problems

    def test_a_share_below_min_per_replica_is_raised_to_it(self) -> None:
        # Whether the fleet is then over budget is the ledger's to count and report.
        for available in (50, 0, -30):
            d = decide(SizingSpec(connection_budget=50, min_per_replica=10), obs(available, 6), InForce(), now=0)
            assert d.limits[DEFAULT_POOL].max_connections == 10 and not d.problems

    def test_keepalive_share(self) -> None:
        d = decide(SizingSpec(connection_budget=100, keepalive_share=0.25), obs(100, 1), InForce(), now=0)
        assert d.limits[DEFAULT_POOL] == Limits(max_connections=100, max_keepalive_connections=25)
        d = decide(SizingSpec(connection_budget=100, keepalive_share=1.0), obs(100, 3), InForce(), now=0)
        assert d.limits[DEFAULT_POOL] == Limits(max_connections=33, max_keepalive_connections=33)

    def test_proxy_budgets_are_sized_separately(self) -> None:
        spec = SizingSpec(connection_budget=600, pool_budgets={"http://proxy-a:3128": 60})
        observed = FleetObservation(available={DEFAULT_POOL: 600, "http://proxy-a:3128": 60}, ready=4)
        d = decide(spec, observed, InForce(), now=0)
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
        assert decide(spec, obs(120, 2), InForce(), now=0).limits[DEFAULT_POOL].max_connections == 50
        assert decide(spec, obs(120, 4), InForce(), now=0).limits[DEFAULT_POOL].max_connections == 30

    def test_measured_demand_when_concurrency_is_unset(self) -> None:
        spec = SizingSpec(
            connection_budget=1000,
            mode=Mode.FORMULA,
            formula=FormulaInputs(latency_seconds=0.1, processing_time_seconds=0.1),
        )
        d = decide(spec, obs(1000, 2, demand_per_replica={DEFAULT_POOL: 7.0}), InForce(), now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 14 and not d.problems

    def test_no_measurement_falls_back_to_the_share(self) -> None:
        spec = SizingSpec(
            connection_budget=100,
            mode=Mode.FORMULA,
            formula=FormulaInputs(latency_seconds=0.1, processing_time_seconds=0.1),
        )
        d = decide(spec, obs(100, 2), InForce(), now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 50
        assert [p.reason for p in d.problems] == [FORMULA_INPUTS_UNAVAILABLE]


class TestHysteresis:
    spec = SizingSpec(connection_budget=60, stabilization_seconds=10)

    def test_scale_up_shrinks_at_once(self) -> None:
        d = decide(self.spec, obs(60, 6), InForce(limits={DEFAULT_POOL: lim(30, 15)}), now=100)
        assert d.limits[DEFAULT_POOL].max_connections == 10 and d.pending is None

    def test_scale_down_grows_only_after_the_window(self) -> None:
        before = InForce(limits={DEFAULT_POOL: lim(10, 5)})
        d1 = decide(self.spec, obs(60, 3), before, now=100)
        assert d1.limits[DEFAULT_POOL].max_connections == 10
        assert d1.pending == Pending(limits={DEFAULT_POOL: lim(20, 10)}, since=100)
        d2 = decide(self.spec, obs(60, 3), InForce(limits=d1.limits, pending=d1.pending), now=109.9)
        assert d2.limits[DEFAULT_POOL].max_connections == 10 and d2.pending is not None
        d3 = decide(self.spec, obs(60, 3), InForce(limits=d2.limits, pending=d2.pending), now=110)
        assert d3.limits[DEFAULT_POOL].max_connections == 20 and d3.pending is None

    def test_flapping_hpa_does_not_thrash(self) -> None:
        state = InForce(limits={DEFAULT_POOL: lim(10, 5)})
        seen = []
        for step, replicas in enumerate([3, 6, 3, 6, 3, 6, 3, 6]):
            d = decide(self.spec, obs(60, replicas), state, now=100 + 4 * step)
            seen.append(d.limits[DEFAULT_POOL].max_connections)
            state = InForce(limits=d.limits, pending=d.pending)
        assert seen == [10] * 8

    def test_a_new_spec_skips_the_window(self) -> None:
        state = InForce(limits={DEFAULT_POOL: lim(10, 5)}, spec_changed=True)
        assert decide(self.spec, obs(60, 3), state, now=100).limits[DEFAULT_POOL].max_connections == 20

    def test_formula_demand_dip_is_deferred(self) -> None:
        spec = SizingSpec(
            connection_budget=600,
            mode=Mode.FORMULA,
            stabilization_seconds=10,
            formula=FormulaInputs(latency_seconds=1, processing_time_seconds=1),
        )
        state = InForce(limits={DEFAULT_POOL: lim(40, 20)})
        d = decide(spec, obs(600, 2, demand_per_replica={DEFAULT_POOL: 5}), state, now=0)
        assert d.limits[DEFAULT_POOL].max_connections == 40 and d.pending is not None
        # ... but a shrink the budget needs is immediate even in formula mode:
        d = decide(spec, obs(600, 20, demand_per_replica={DEFAULT_POOL: 50}), state, now=0)
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
    return InForce(limits=limits, pending=pending, spec_changed=draw(st.booleans()))


@st.composite
def observations(draw: st.DrawFn) -> FleetObservation:
    return FleetObservation(
        available={
            pool: draw(st.integers(min_value=-1_000, max_value=1_000_000))
            for pool in (DEFAULT_POOL, "http://a:1", "http://b:2")
        },
        ready=draw(st.integers(min_value=0, max_value=500)),
        demand_per_replica=draw(
            st.dictionaries(
                st.sampled_from([DEFAULT_POOL, "http://a:1"]), st.floats(min_value=0, max_value=1e4), max_size=2
            )
        ),
    )


@settings(max_examples=500, deadline=None)
@given(spec=specs(), observed=observations(), before=previous(), now=st.floats(min_value=0, max_value=2_000))
def test_what_is_put_in_force_never_exceeds_the_share_unless_the_minimum_forces_it(
    spec: SizingSpec, observed: FleetObservation, before: InForce, now: float
) -> None:
    """For any share, clamps and previous state: limits in force x ready <= available, or the minimum
    forces more; a deferred change never keeps a limit above what is available now."""
    d = decide(spec, observed, before, now=now)
    n = observed.dividers
    for pool in spec.budgets():
        available = observed.available[pool]
        assert d.target[pool].max_connections >= spec.min_per_replica
        kept = before.limits.get(pool)  # a deferred growth keeps what was in force
        assert d.limits[pool].max_connections >= spec.min_per_replica or d.limits[pool] == kept
        for limits in (d.limits[pool], d.target[pool]):
            assert 0 <= limits.max_keepalive_connections <= limits.max_connections
            if spec.max_per_replica is not None:
                assert limits.max_connections <= max(
                    spec.max_per_replica, before.limits.get(pool, limits).max_connections
                )
            if limits.max_connections * n > available:
                assert limits.max_connections <= spec.min_per_replica, (pool, limits, n, available)


@settings(max_examples=300, deadline=None)
@given(
    available=st.integers(min_value=-100, max_value=1_000_000),
    n=st.integers(min_value=1, max_value=10_000),
    min_per=st.integers(min_value=1, max_value=100),
    max_per=st.one_of(st.none(), st.integers(100, 100_000)),
)
def test_budget_division_is_the_largest_fair_share(available: int, n: int, min_per: int, max_per: int | None) -> None:
    spec = SizingSpec(connection_budget=max(1, available), min_per_replica=min_per, max_per_replica=max_per)
    limit, problems = per_replica_limit(spec, available=available, ready=n)
    assert not problems
    if min_per * n <= available:
        assert limit * n <= available
        ceiling = available // n if max_per is None else min(available // n, max_per)
        assert limit == min(max(ceiling, min_per), 100_000)  # one more each would break the share or a clamp
    else:
        assert limit == min_per
    assert math.isfinite(limit)
