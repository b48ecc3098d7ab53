"""The chart's Grafana dashboard and alerts against a real Prometheus (Debian's ``prometheus``).

The Prometheus started here scrapes a real ``fetchpool serve`` (fetching pages from the test
nginx, with traces exported to a real OTLP receiver) and an operator metrics endpoint, loads the
chart's rendered alert rules, and then:
- every query of every dashboard panel, with the dashboard's variables filled in as Grafana
  would, returns series; every variable's query returns values;
- every series selector of every alert matches live series (the release's labels are right) and
  every rule evaluates without error;
- the latency histogram's exemplars reach Prometheus and name traces the service exported.

The operator's side is the operator's own metrics code (``fetchpool.operator.health``: its
``Health`` registry behind the same ``serve_metrics`` endpoint ``fetchpool operator --metrics``
runs), fed the numbers a reconciliation round reports; the rounds themselves, against kmock, are
tested in tests/unit/test_operator_metrics.py and tests/operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chartlib
import grpc
import pytest
import yaml
from fetchpool.operator.health import Health, PoolReport, serve_metrics
from fetchpool.v1 import fetch_pb2 as pb
from fetchpool.v1 import fetch_pb2_grpc as pb_grpc
from support import Nginx, free_port
from support.fetchpool_service import FetchpoolService
from support.otlp_receiver import OtlpReceiver
from support.prometheus import Prometheus, ScrapeJob

DASHBOARD = chartlib.CHART / "dashboards" / "fetchpool.json"
NAMESPACE, SERVICE, FETCHPOOL = chartlib.NAMESPACE, "demo-fetchpool", "demo-fetchpool"
#: Where the operator runs (cluster-wide, in its own namespace): its target's namespace label,
#: which must not replace the FetchPool's (the PodMonitor's honorLabels).
OPERATOR_NAMESPACE = "fetchpool-system"
#: What Grafana puts for the variables: one namespace and service, "All" (allValue .*) for the rest.
VARIABLES = {
    "namespace": NAMESPACE,
    "service": SERVICE,
    "pod": ".*",
    "pool": ".*",
    "fetchpool": ".*",
    "__rate_interval": "10s",
}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def fill(query: str) -> str:
    """``query`` with the dashboard's variables replaced as Grafana does (``$name``, ``${name}``)."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"unknown variable ${name} in {query}"
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, query)


# --- the dashboard as a file and as a ConfigMap ------------------------------------------------------


def test_dashboard_panels_cover_the_fleet() -> None:
    board = dashboard()
    assert board["uid"] == "fetchpool" and board["title"] == "fetchpool"
    titles = {p["title"] for p in panels()}
    assert {
        "Fetch rate by pool",
        "Errors by kind",
        "Fetch latency",
        "Open connections vs limit",
        "Requests active and waiting vs working limit",
        "Connection reuse",
        "Pool wait",
        "Proxy ejections",
        "Budget vs sum of limits",
    } <= titles
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    exemplars = [t for p in panels() for t in p["targets"] if t.get("exemplar")]
    assert exemplars and all("http_client_request_duration_seconds_bucket" in t["expr"] for t in exemplars)


def test_dashboard_queries_use_its_variables_as_grafana_expects() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    multi = {name for name, v in variables.items() if v.get("multi")}
    assert multi == {"pod", "pool", "fetchpool"}
    for name in multi:
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'namespace="$namespace"' in expr, f"{panel['title']}: every query stays in the namespace"
            for name in multi:  # a multi-value variable expands to a regex: only with =~
                assert not re.search(rf'[^~]"\${name}"', expr), f"{panel['title']}: ${name} needs =~"
            assert not re.search(r'namespace="(?!\$)', expr), f"{panel['title']}: hard-coded namespace"


def test_dashboard_configmap_for_the_grafana_sidecar() -> None:
    r = chartlib.render("hpa")
    cm = r.get("ConfigMap", "demo-fetchpool-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "crawling"
    assert json.loads(cm["data"]["fetchpool.json"]) == dashboard()
    elsewhere = chartlib.render(
        {"metrics": {"enabled": True, "grafanaDashboard": {"enabled": True, "namespace": "monitoring"}}}
    )
    assert elsewhere.get("ConfigMap", "demo-fetchpool-dashboard")["metadata"]["namespace"] == "monitoring"
    assert not chartlib.render("default").has("ConfigMap", "demo-fetchpool-dashboard")


# --- against a real Prometheus -----------------------------------------------------------------------


class OperatorMetrics:
    """The operator's metrics endpoint (``serve_metrics``) on a loopback port, in a thread with its
    own event loop, reporting one divided FetchPool of 400 connections over 2 replicas."""

    def __init__(self) -> None:
        self.health = Health()
        self.set_limit_sum(400)
        for _ in range(3):
            self.health.reconciled(NAMESPACE, FETCHPOOL)
        self.health.event()
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(10), "the operator's metrics endpoint did not start"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        started = asyncio.Event()
        self._server = self._loop.create_task(
            serve_metrics(self.health, f"http://127.0.0.1:{self.port}/metrics", ready=started))
        self._loop.run_until_complete(started.wait())
        ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._server)

    def set_limit_sum(self, connections: int) -> None:
        """A round's report, with ``connections`` as the sum of the live pods' limits."""
        self.health.report(NAMESPACE, FETCHPOOL, PoolReport(
            budget=400, limit_sum=connections, replicas=2, per_replica=200, unconfirmed=0,
            conditions=[("Ready", "True", "Divided"), ("Degraded", "False", "Divided")]))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.cancel)
        self._thread.join(10)
        self._loop.close()


class Traffic:
    """Fetches through the service in the background until stopped (at most ``seconds``, and
    ``rounds`` batches): pages of nginx over HTTP/1.1 and HTTP/2, a 404, and 1 in 20 a refused
    connection (CONNECT), so each panel has series to show."""

    def __init__(self, service: FetchpoolService, nginx: Nginx, *, seconds: float = 120, rounds: int = 400) -> None:
        dead = f"http://127.0.0.1:{free_port()}/nothing-listens"
        self.urls = [
            *(f"{nginx.https_url}/small.html?n={i}" for i in range(12)),
            *(f"{nginx.http_url}/small.html?n={i}" for i in range(6)),
            f"{nginx.https_url}/no-such-page.html",
            dead,
        ]
        self._service = service
        self._deadline = time.monotonic() + seconds
        self._rounds = rounds
        self._stop = threading.Event()
        self.results: list[pb.FetchResult] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self._service.target) as channel:
            stub = pb_grpc.FetchServiceStub(channel)
            for batch in range(self._rounds):
                if self._stop.is_set() or time.monotonic() > self._deadline:
                    return
                request = pb.FetchManyRequest(
                    requests=[pb.FetchRequest(url=u, id=f"{batch}-{i}") for i, u in enumerate(self.urls)])
                self.results.extend(stub.FetchMany(request, timeout=30))
                self._stop.wait(0.3)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(35)


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    groups = chartlib.render({"metrics": {"enabled": True, "prometheusRule": {"enabled": True}}}).get(
        "PrometheusRule")["spec"]["groups"]
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(nginx: Nginx, certs: Any, rules_file: Path) -> Iterator[dict[str, Any]]:
    """The service (with traces), the operator's metrics, Prometheus scraping both, traffic."""
    receiver = OtlpReceiver().start()
    operator = OperatorMetrics()
    metrics_port = free_port()
    env = {
        "FETCHPOOL_METRICS_PORT": str(metrics_port),
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    service = FetchpoolService(ca_pem=certs.ca_pem, env=env).start()
    pod_labels = {"namespace": NAMESPACE, "service": SERVICE, "pod": "demo-fetchpool-7d9f-abcde"}
    prometheus = Prometheus(
        [
            # What a ServiceMonitor gives the service's targets (namespace, service, pod).
            ScrapeJob("fetchpool", f"127.0.0.1:{metrics_port}", pod_labels),
            # What the PodMonitor gives the operator's, with honorLabels.
            ScrapeJob("fetchpool-operator", f"127.0.0.1:{operator.port}",
                      {"namespace": OPERATOR_NAMESPACE, "pod": "demo-fetchpool-operator-5c6b-xyz"}, honor_labels=True),
        ],
        rule_files=[rules_file],
    )
    try:
        prometheus.start()
        with Traffic(service, nginx) as traffic:
            # Enough scrapes of traffic for every rate() window of the dashboard.
            prometheus.wait_for(lambda: prometheus.query(
                f'sum(increase(http_client_request_duration_seconds_count{{namespace="{NAMESPACE}"}}[10s])) > 0'),
                timeout=60, what="fetches counted over 10 s")
            prometheus.wait_for(lambda: prometheus.query(
                f'count_over_time(fetchpool_operator_budget_connections{{namespace="{NAMESPACE}"}}[10s]) >= 3'),
                timeout=30, what="the operator's series")
            yield {"prometheus": prometheus, "receiver": receiver, "operator": operator, "traffic": traffic}
    finally:
        prometheus.close()
        service.close()
        operator.close()
        receiver.stop()


def _panel_targets() -> list[Any]:
    return [pytest.param(t["expr"], id=f"{p['title']}/{t['refId']}") for p in panels() for t in p["targets"]]


@pytest.mark.parametrize("expr", _panel_targets())
def test_every_panel_query_returns_series(stack: dict[str, Any], expr: str) -> None:
    prometheus: Prometheus = stack["prometheus"]
    query = fill(expr)
    series = prometheus.wait_for(lambda: prometheus.query(query), timeout=20, what=f"series of {query}")
    assert all(s["metric"].get("namespace", NAMESPACE) == NAMESPACE for s in series)


def test_every_variable_query_returns_values(stack: dict[str, Any]) -> None:
    prometheus: Prometheus = stack["prometheus"]
    found = {}
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        found[variable["name"]] = prometheus.label_values(match.group(2), fill(match.group(1)))
    assert found == {
        "namespace": [NAMESPACE],
        "service": [SERVICE],
        "pod": ["demo-fetchpool-7d9f-abcde"],
        "pool": ["direct"],
        "fetchpool": [FETCHPOOL],
    }


def test_panels_show_the_traffic(stack: dict[str, Any]) -> None:
    """Not only series: the numbers the traffic makes (fetches, errors by kind, a latency, the budget)."""
    prometheus: Prometheus = stack["prometheus"]
    by_title = {p["title"]: p["targets"] for p in panels()}

    def values(title: str, ref: int = 0) -> dict[str, float]:
        result = prometheus.query(fill(by_title[title][ref]["expr"]))
        return {json.dumps(s["metric"], sort_keys=True): float(s["value"][1]) for s in result}

    assert sum(values("Fetch rate by pool").values()) > 0
    def kinds() -> set[str]:
        return {json.loads(k).get("error_type", "") for k, v in values("Errors by kind").items() if v > 0}

    prometheus.wait_for(lambda: kinds() == {"CONNECT", "404"}, timeout=20, what="CONNECT and 404 errors")
    p50 = next(iter(values("Fetch latency").values()))
    assert 0 < p50 < 5
    budget = {json.loads(k).get("fetchpool", ""): v for k, v in values("Budget vs sum of limits").items()}
    assert budget == {FETCHPOOL: 400.0}
    limits = values("Open connections vs limit", 1)
    assert set(limits.values()) == {100.0}, "the service's default limit, as the pod reports it"


def test_alert_selectors_match_the_live_series(stack: dict[str, Any], rules_file: Path) -> None:
    """Each alert's selectors, without their value filters, select live series: the release's
    labels (namespace, service, fetchpool) are the ones the targets carry. And every rule evaluates."""
    prometheus: Prometheus = stack["prometheus"]
    rules = [r for g in yaml.safe_load(rules_file.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        for metric, matchers in re.findall(r"\b([a-z_]+)\{([^}]*)\}", rule["expr"]):
            kept = ",".join(m for m in re.findall(r'\w+=~?"[^"]*"', matchers)
                            if m.split("=")[0] not in ("error_type", "type", "status"))
            selector = f"{metric}{{{kept}}}"
            assert prometheus.wait_for(lambda s=selector: prometheus.query(s), timeout=15, what=selector), (
                f"{rule['alert']}: {selector} selects nothing")
    loaded = prometheus.wait_for(lambda: [r for g in prometheus.rule_groups() for r in g["rules"]
                                          if r.get("lastEvaluation", "").startswith("20")] or None,
                                 timeout=20, what="rule evaluations")
    assert {r["name"] for r in loaded} == {r["alert"] for r in rules}
    for rule in loaded:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
        assert rule["state"] == "inactive", f"{rule['name']} is {rule['state']} on a healthy fleet"


def test_over_budget_alert_on_the_live_operator_series(stack: dict[str, Any]) -> None:
    prometheus: Prometheus = stack["prometheus"]
    operator: OperatorMetrics = stack["operator"]

    def over_budget() -> list[dict[str, Any]]:
        return [a for a in prometheus.api("alerts")["alerts"] if a["labels"]["alertname"] == "FetchpoolOverBudget"]

    operator.set_limit_sum(450)
    try:
        alert = prometheus.wait_for(over_budget, timeout=20, what="FetchpoolOverBudget pending")
        assert alert[0]["state"] == "pending"  # for: 2m
        assert alert[0]["labels"]["namespace"] == NAMESPACE and alert[0]["labels"]["fetchpool"] == FETCHPOOL
        assert float(alert[0]["value"]) == 450
    finally:
        operator.set_limit_sum(400)
    prometheus.wait_for(lambda: not over_budget(), timeout=20, what="FetchpoolOverBudget resolved")


def test_latency_exemplars_link_to_exported_traces(stack: dict[str, Any]) -> None:
    """The service's OpenMetrics exemplars reach Prometheus (exemplar storage) and each names a
    CLIENT span the service exported over OTLP: a latency bucket links to a real trace."""
    prometheus: Prometheus = stack["prometheus"]
    receiver: OtlpReceiver = stack["receiver"]
    query = f'http_client_request_duration_seconds_bucket{{namespace="{NAMESPACE}",service="{SERVICE}"}}'
    found = prometheus.wait_for(lambda: prometheus.query_exemplars(query), timeout=20, what="exemplars")
    linked = {(e["labels"]["trace_id"], e["labels"]["span_id"]) for series in found for e in series["exemplars"]}
    assert linked

    def exported() -> bool:  # CLIENT spans (OTLP kind 3) the receiver has
        return linked <= {(s.trace_id, s.span_id) for s in receiver.spans if s.kind == 3}

    prometheus.wait_for(exported, timeout=15, what=f"the spans of the exemplars {sorted(linked)[:3]}...")
    # And the bucket's bound holds the exemplar's value.
    for series in found:
        bound = float(series["seriesLabels"]["le"])
        assert all(float(e["value"]) <= bound for e in series["exemplars"])
