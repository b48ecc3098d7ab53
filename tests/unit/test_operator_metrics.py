"""The operator's Prometheus metrics (``fetchpool.operator.health``): the names the chart's alerts and
dashboard rely on, one series set per FetchPool, conditions that follow the status, scraped over HTTP
with the Prometheus text format and OpenMetrics, parsed by prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

from fetchpool.operator.health import Health, PoolReport, serve_metrics
from prometheus_client.parser import text_string_to_metric_families

#: The contract between the operator and the chart's monitoring (names without the
#: ``fetchpool_operator_`` prefix; counters without ``_total``); every series but the last is
#: labelled ``namespace`` and ``fetchpool``.
CONTRACT = {
    "budget_connections": "gauge",
    "limit_sum_connections": "gauge",
    "replicas": "gauge",
    "per_replica_limit_connections": "gauge",
    "pods_unconfirmed": "gauge",
    "condition": "gauge",
    "reconciles": "counter",
    "reconcile_errors": "counter",
    "delivery_failures": "counter",
    "seconds_since_last_event": "gauge",
}


def samples(health: Health) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = health.render()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def report(**kw: object) -> PoolReport:
    base: dict[str, object] = {
        "budget": 60,
        "limit_sum": 58,
        "replicas": 2,
        "per_replica": 29,
        "unconfirmed": 0,
        "conditions": (("Ready", "True", "LimitsApplied"), ("Degraded", "False", "AsExpected")),
    }
    return PoolReport(**{**base, **kw})  # type: ignore[arg-type]


def test_exactly_the_contracts_names_and_types() -> None:
    health = Health()
    health.report("ns", "pool", report())
    health.reconciled("ns", "pool")
    health.reconcile_failed("ns", "pool")
    health.delivery_failed("ns", "pool")
    body, _ = health.render()
    families = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
    ours = {name.removeprefix("fetchpool_operator_"): kind for name, kind in families.items()}
    assert ours == CONTRACT


def test_series_per_fetchpool() -> None:
    health = Health()
    health.report("a", "one", report())
    health.report("b", "two", report(budget=400, limit_sum=401, unconfirmed=3))
    for _ in range(3):
        health.reconciled("b", "two")
    got = samples(health)
    one = (("fetchpool", "one"), ("namespace", "a"))
    two = (("fetchpool", "two"), ("namespace", "b"))
    assert got[("fetchpool_operator_budget_connections", one)] == 60
    assert got[("fetchpool_operator_budget_connections", two)] == 400
    assert got[("fetchpool_operator_limit_sum_connections", two)] == 401  # over budget: an alert's input
    assert got[("fetchpool_operator_pods_unconfirmed", two)] == 3
    assert got[("fetchpool_operator_reconciles_total", two)] == 3
    # A known FetchPool's counters are exported from the start, at 0 (rate() and increase() need
    # the series before its first error, not only after).
    assert got[("fetchpool_operator_reconciles_total", one)] == 0
    assert got[("fetchpool_operator_reconcile_errors_total", two)] == 0
    assert got[("fetchpool_operator_delivery_failures_total", one)] == 0
    assert got[("fetchpool_operator_seconds_since_last_event", ())] >= 0


def test_conditions_follow_the_status_and_a_deleted_fetchpool_goes_away() -> None:
    health = Health()
    health.report("ns", "pool", report())
    health.report(
        "ns",
        "pool",
        report(conditions=(("Ready", "False", "PodsUnreachable"), ("Degraded", "True", "PodsUnreachable"))),
    )
    conditions = {
        dict(labels)["type"]: (dict(labels)["status"], dict(labels)["reason"])
        for (name, labels), value in samples(health).items()
        if name == "fetchpool_operator_condition" and value == 1
    }
    assert conditions == {"Ready": ("False", "PodsUnreachable"), "Degraded": ("True", "PodsUnreachable")}
    assert len([k for k in samples(health) if k[0] == "fetchpool_operator_condition"]) == 2  # old ones removed
    health.report("ns", "pool", report(limit_sum=None))  # not known this round: no stale value
    assert not [k for k in samples(health) if k[0] == "fetchpool_operator_limit_sum_connections"]
    health.reconciled("ns", "pool")
    health.forget("ns", "pool")
    left = {name for name, labels in samples(health) if labels}
    assert left == set()


async def test_served_over_http_in_both_formats() -> None:
    health = Health()
    health.report("ns", "pool", report())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ready = asyncio.Event()
    task = asyncio.create_task(serve_metrics(health, f"http://127.0.0.1:{port}/metrics", ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 5)

        def get(accept: str | None) -> tuple[str, str]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
            if accept:
                request.add_header("Accept", accept)
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.read().decode(), response.headers["Content-Type"]

        text, kind = await asyncio.to_thread(get, None)
        assert kind.startswith("text/plain; version=0.0.4")
        assert 'fetchpool_operator_budget_connections{fetchpool="pool",namespace="ns"} 60.0' in text
        open_metrics, kind = await asyncio.to_thread(get, "application/openmetrics-text; version=1.0.0")
        assert kind.startswith("application/openmetrics-text") and open_metrics.rstrip().endswith("# EOF")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
