"""The FetchPool resource shape (``fetchpool.operator.resource``): parsing, status, pods, selectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fetchpool.operator import pods, resource
from fetchpool.operator.policy import DEFAULT_POOL, Limits, Mode, Pending
from fetchpool.operator.status import merge_patch

GOOD: dict[str, Any] = {"target": {"name": "web"}, "connectionBudget": 600}


class TestParseSpec:
    def test_defaults(self) -> None:
        spec, problems = resource.parse_spec("pool", GOOD)
        assert problems == [] and spec is not None
        assert spec.deployment == "web" and spec.hpa_name is None and spec.config_map == "pool-limits"
        assert spec.sizing.connection_budget == 600 and spec.sizing.min_per_replica == 1
        assert spec.sizing.mode is Mode.BUDGET and spec.grpc_port == 50051

    def test_everything(self) -> None:
        spec, problems = resource.parse_spec(
            "pool",
            {
                "target": {"kind": "Deployment", "name": "web", "hpaName": "web-hpa"},
                "connectionBudget": 600,
                "proxyBudgets": {"http://p:1": 60},
                "minPerReplica": 2,
                "maxPerReplica": 200,
                "keepaliveShare": 0.25,
                "mode": "formula",
                "formula": {"concurrency": 8, "latencySeconds": 0.3, "processingTimeSeconds": 0.1},
                "stabilizationSeconds": 5,
                "configMapName": "lims",
                "grpcPort": 9000,
                "keepaliveExpirySeconds": 10,
                "poolTimeoutSeconds": 3,
            },
        )
        assert problems == [] and spec is not None
        assert spec.hpa_name == "web-hpa" and spec.config_map == "lims" and spec.grpc_port == 9000
        assert spec.sizing.pool_budgets == {"http://p:1": 60} and spec.sizing.formula is not None
        assert spec.sizing.formula.concurrency == 8 and spec.keepalive_expiry_seconds == 10.0

    @pytest.mark.parametrize(
        ("spec", "expected"),
        [
            (
                {"connectionBudget": 10},
                ["spec.target.name is missing: name the Deployment whose replicas divide the budget"],
            ),
            (
                {"target": {}, "connectionBudget": 10},
                ["spec.target.name is missing: name the Deployment whose replicas divide the budget"],
            ),
            ({"target": {"name": "web"}}, ["spec.connectionBudget is missing: the fleet's total connections per pool"]),
            ({**GOOD, "connectionBudget": -5}, ["spec.connectionBudget must be >= 1 connection, got -5"]),
            ({**GOOD, "connectionBudget": "lots"}, ["spec.connectionBudget must be an integer, got 'lots'"]),
            ({**GOOD, "minPerReplica": -1}, ["spec.minPerReplica must be >= 1 connection, got -1"]),
            (
                {**GOOD, "minPerReplica": 5, "maxPerReplica": 4},
                ["spec.maxPerReplica (4) must be >= spec.minPerReplica (5)"],
            ),
            ({**GOOD, "mode": "magic"}, ["spec.mode must be 'budget' or 'formula', got 'magic'"]),
            (
                {**GOOD, "mode": "formula", "formula": {"latencySeconds": 1}},
                ["spec.formula.processingTimeSeconds is missing (seconds of work per response)"],
            ),
            (
                {**GOOD, "target": {"kind": "StatefulSet", "name": "x"}},
                ["spec.target.kind must be 'Deployment', got 'StatefulSet'"],
            ),
            ({**GOOD, "grpcPort": 70000}, ["spec.grpcPort must be in 1..65535, got 70000"]),
        ],
    )
    def test_problems_are_exact(self, spec: dict[str, Any], expected: list[str]) -> None:
        parsed, problems = resource.parse_spec("pool", spec)
        assert parsed is None and problems == expected


def test_limits_file_is_what_the_service_reads(tmp_path: Path) -> None:
    """The ConfigMap's limits.json loads with the service's own --limits-file reader."""
    config = pytest.importorskip("fetchpool.config")
    content = resource.limits_file(
        {
            DEFAULT_POOL: Limits(max_connections=20, max_keepalive_connections=10),
            "http://p:1": Limits(max_connections=5, max_keepalive_connections=2),
        },
        keepalive_expiry_seconds=7.5,
        pool_timeout_seconds=3,
    )
    assert content == {
        "max_connections": 5,
        "max_keepalive_connections": 2,
        "keepalive_expiry": 7.5,
        "pool_timeout": 3,
    }  # the smallest pool: a new pod starts within every budget
    path = tmp_path / "limits.json"
    path.write_text(json.dumps(content))
    loaded = config.load_limits_file(str(path), config.PoolLimits())
    assert (loaded.max_connections, loaded.max_keepalive_connections, loaded.keepalive_expiry, loaded.pool_timeout) == (
        5,
        2,
        7.5,
        3.0,
    )


def test_status_round_trip() -> None:
    limits = {
        DEFAULT_POOL: Limits(max_connections=20, max_keepalive_connections=10),
        "http://p:1": Limits(max_connections=5, max_keepalive_connections=2),
    }
    status = {
        "limits": resource.limits_to_status(limits),
        "pending": {"limits": resource.limits_to_status(limits), "since": resource.format_time(1_700_000_000.5)},
        "offered": resource.limits_to_status({DEFAULT_POOL: Limits(max_connections=30, max_keepalive_connections=1)}),
        "observedGeneration": 3,
    }
    assert status["limits"] == {
        "maxConnections": 20,
        "maxKeepaliveConnections": 10,
        "pools": {"http://p:1": {"maxConnections": 5, "maxKeepaliveConnections": 2}},
    }
    state = resource.in_force_from_status(status, generation=4)
    assert state.limits == limits
    assert state.pending == Pending(limits=limits, since=1_700_000_000.5)
    assert state.spec_changed is True
    assert resource.in_force_from_status(None, None).limits == {}
    assert resource.offered_from_status(status) == {DEFAULT_POOL: 30}
    assert resource.offered_from_status({}) == {}


@pytest.mark.parametrize(
    ("strategy", "replicas", "surge"),
    [
        ({}, 10, 3),  # no strategy: RollingUpdate with maxSurge 25 %
        ({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 2}}, 10, 2),
        ({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "50%"}}, 3, 2),
        ({"type": "Recreate"}, 10, 0),
        ({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "junk"}}, 4, 1),  # unreadable: the default
    ],
)
def test_max_surge_of_a_deployment(strategy: dict[str, Any], replicas: int, surge: int) -> None:
    assert resource.max_surge_of({"spec": {"strategy": strategy}}, replicas) == surge


def test_the_oldest_fetchpool_on_a_deployment_claims_it() -> None:
    def fp(name: str, created: str, target: str = "web", **meta: Any) -> dict[str, Any]:
        return {"metadata": {"name": name, "creationTimestamp": created, **meta}, "spec": {"target": {"name": target}}}

    pools = [
        fp("b", "2026-01-02T00:00:00Z"),
        fp("a", "2026-01-03T00:00:00Z"),
        fp("c", "2026-01-01T00:00:00Z", target="other"),
        fp("old", "2025-01-01T00:00:00Z", deletionTimestamp="2026-01-04T00:00:00Z"),  # being deleted
    ]
    assert resource.claimant(pools, "web") == "b"
    assert resource.claimant(pools, "other") == "c"
    assert resource.claimant(pools, "nothing") is None
    same_second = [fp("z", "2026-01-01T00:00:00Z"), fp("y", "2026-01-01T00:00:00Z")]
    assert resource.claimant(same_second, "web") == "y"  # then by name


def test_conditions_keep_transition_time_until_status_flips() -> None:
    first = resource.conditions_patch(None, [resource.Condition(type="Ready", status=True, reason="A")], now=100)
    same = resource.conditions_patch(first, [resource.Condition(type="Ready", status=True, reason="B")], now=200)
    flip = resource.conditions_patch(same, [resource.Condition(type="Ready", status=False, reason="C")], now=300)
    assert first[0]["lastTransitionTime"] == same[0]["lastTransitionTime"] == "1970-01-01T00:01:40Z"
    assert flip[0]["lastTransitionTime"] == "1970-01-01T00:05:00Z" and flip[0]["status"] == "False"


class TestPods:
    def pod(self, **kw: Any) -> dict[str, Any]:
        pod: dict[str, Any] = {
            "metadata": {"name": "p", "uid": "u", "labels": {"app": "web"}, "annotations": {}},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "grpc", "containerPort": 7000}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
        }
        for key, value in kw.items():
            pod[key].update(value)
        return pod

    def test_address(self) -> None:
        assert pods.pod_address(self.pod()) == "10.0.0.1:7000"
        assert (
            pods.pod_address(self.pod(metadata={"annotations": {"fetchpool.io/grpc-port": "5001"}}))
            == "10.0.0.1:5001"
        )
        assert pods.pod_address(self.pod(spec={"containers": []}), 50051) == "10.0.0.1:50051"
        assert pods.pod_address(self.pod(status={"podIP": "fd00::1"})) == "[fd00::1]:7000"
        assert pods.pod_address(self.pod(status={"podIP": None})) is None

    def test_liveness_and_readiness(self) -> None:
        assert pods.pod_is_live(self.pod()) and pods.pod_is_ready(self.pod())
        pending = self.pod(status={"phase": "Pending", "podIP": None, "conditions": []})
        assert pods.pod_is_live(pending) and not pods.pod_is_ready(pending)
        assert not pods.pod_is_live(self.pod(status={"phase": "Succeeded"}))
        assert not pods.pod_is_ready(self.pod(status={"conditions": [{"type": "Ready", "status": "False"}]}))
        view = pods.pod_view(self.pod(metadata={"deletionTimestamp": "2026-01-01T00:00:00Z"}), 1)
        assert view.live and view.terminating and view.started
        assert not pods.pod_view(pending, 1).started

    def test_selectors(self) -> None:
        sel = {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "canary", "operator": "DoesNotExist"},
            ],
        }
        assert pods.selector_matches(sel, {"app": "web", "tier": "a"})
        assert not pods.selector_matches(sel, {"app": "web", "tier": "c"})
        assert not pods.selector_matches(sel, {"app": "web", "tier": "a", "canary": "1"})
        assert not pods.selector_matches({}, {"app": "web"})  # an empty selector matches nothing
        assert pods.label_selector_string(sel) == "app=web,tier in (a,b),!canary"


def test_merge_patch_is_minimal() -> None:
    old = {
        "limits": {"maxConnections": 10, "pools": {"a": 1, "b": 2}},
        "pending": {"x": 1},
        "kopf": {"k": 1},
        "appliedAt": "t",
    }
    new = {"limits": {"maxConnections": 10, "pools": {"a": 1}}, "pending": None, "appliedAt": "t"}
    assert merge_patch(old, new) == {"limits": {"pools": {"b": None}}, "pending": None}
    assert merge_patch(old, {"appliedAt": "t"}) == {}
