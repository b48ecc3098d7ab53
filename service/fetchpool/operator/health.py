"""Operator health and metrics: the age of the last watch event (liveness) and Prometheus metrics per FetchPool.

Metrics (prometheus-client, on ``--metrics http://0.0.0.0:9090/metrics``; Prometheus text or
OpenMetrics as the scraper asks). Every series but the last is labelled ``namespace`` and
``fetchpool`` (the FetchPool object's); the names are the contract of the chart's alerts and
dashboard (``fetchpool_operator_`` prefix omitted):

========================================  =======  ==================================================
``budget_connections``                    gauge    the FetchPool's ``spec.connectionBudget``
``limit_sum_connections``                 gauge    sum over live pods of the ``max_connections`` each
                                                   may hold now, as the operator counts it (a pod that
                                                   did not confirm counts at the larger of its old and
                                                   new limit); over budget = this > ``budget``
``replicas``                              gauge    the ready replicas the last division used
``per_replica_limit_connections``         gauge    the per-replica limit last decided
``pods_unconfirmed``                      gauge    live pods that have not (yet) confirmed that limit
``condition``                             gauge    1 per current condition, labels ``type``
                                                   (Ready, Degraded, Conflict), ``status``, ``reason``
``reconciles_total``                      counter  reconciliation rounds
``reconcile_errors_total``                counter  rounds that failed (API errors)
``delivery_failures_total``               counter  ``SetPoolLimits`` exchanges with a pod that failed
``seconds_since_last_event``              gauge    (no labels) since the last watch event of any kind
========================================  =======  ==================================================

``seconds_since_last_event``: kopf re-lists after every watch restart (``server_timeout``, ``410
Gone``, inactivity) and every listed object counts as an event, so a value far above the watch
timeout means the watches are stuck; the liveness probe (kopf's ``--liveness`` endpoint, with
:meth:`Health.probe` as its probe) then fails. A FetchPool's series go away when it is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import aiohttp.web
import prometheus_client
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import choose_encoder

__all__ = ["Health", "PoolReport", "serve_metrics"]

PREFIX = "fetchpool_operator_"
LABELS = ("namespace", "fetchpool")


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolReport:
    """One FetchPool after a round (connections, pods); ``None`` = not known this round."""

    budget: int | None = None
    limit_sum: int | None = None
    replicas: int | None = None
    per_replica: int | None = None
    unconfirmed: int | None = None
    conditions: Sequence[tuple[str, str, str]] = ()  # (type, status, reason)


class Health:
    """The liveness clock and the Prometheus registry shared by the handlers and the reconciler."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_silence_seconds: float = 600.0) -> None:
        self._clock = clock
        self.started = clock()
        self.last_event: float | None = None
        self.max_silence_seconds = max_silence_seconds
        self.watched_pools = 0
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self._gauges = {
            "budget": prometheus_client.Gauge(
                PREFIX + "budget_connections", "The FetchPool's spec.connectionBudget.", LABELS, registry=r
            ),
            "limit_sum": prometheus_client.Gauge(
                PREFIX + "limit_sum_connections",
                "Sum over live pods of the max_connections each may hold now, as the operator counts it.",
                LABELS,
                registry=r,
            ),
            "replicas": prometheus_client.Gauge(
                PREFIX + "replicas", "Ready replicas the last division of the budget used.", LABELS, registry=r
            ),
            "per_replica": prometheus_client.Gauge(
                PREFIX + "per_replica_limit_connections", "The per-replica limit last decided.", LABELS, registry=r
            ),
            "unconfirmed": prometheus_client.Gauge(
                PREFIX + "pods_unconfirmed", "Live pods that have not confirmed the current limit.", LABELS, registry=r
            ),
        }
        self._condition = prometheus_client.Gauge(
            PREFIX + "condition",
            "1 per current condition of the FetchPool.",
            (*LABELS, "type", "status", "reason"),
            registry=r,
        )
        self._counters = _Counters(
            {
                "reconciles": "Reconciliation rounds.",
                "reconcile_errors": "Reconciliation rounds that failed (API errors).",
                "delivery_failures": "SetPoolLimits exchanges with a pod that failed.",
            }
        )
        r.register(self._counters)
        silence = prometheus_client.Gauge(
            PREFIX + "seconds_since_last_event", "Seconds since the last watch event of any watched kind.", registry=r
        )
        silence.set_function(self.seconds_since_last_event)
        self._conditions: dict[tuple[str, str], list[tuple[str, str, str]]] = {}

    # --- liveness ----------------------------------------------------------------------------

    def event(self) -> None:
        """Record one watch event."""
        self.last_event = self._clock()

    def seconds_since_last_event(self) -> float:
        """Seconds since the last event (since start-up when there was none)."""
        return self._clock() - (self.last_event if self.last_event is not None else self.started)

    def probe(self) -> float:
        """kopf liveness probe: the age of the last event; raises when the watches look stuck.

        Only while at least one ``FetchPool`` exists: with nothing to watch, silence is normal.
        """
        age = self.seconds_since_last_event()
        if self.watched_pools and age > self.max_silence_seconds:
            raise RuntimeError(f"no watch event for {age:.0f}s (limit {self.max_silence_seconds:.0f}s)")
        return round(age, 3)

    # --- per FetchPool -----------------------------------------------------------------------

    def reconciled(self, namespace: str, name: str) -> None:
        """One round ran (counted whether it failed or not)."""
        self._counters.inc("reconciles", namespace, name)

    def reconcile_failed(self, namespace: str, name: str) -> None:
        self._counters.inc("reconcile_errors", namespace, name)

    def delivery_failed(self, namespace: str, name: str) -> None:
        self._counters.inc("delivery_failures", namespace, name)

    def report(self, namespace: str, name: str, report: PoolReport) -> None:
        """Set the FetchPool's gauges from a round; a value not known this round is removed."""
        self._counters.know(namespace, name)
        for field, gauge in self._gauges.items():
            value = getattr(report, field)
            if value is None:
                _remove(gauge, namespace, name)
            else:
                gauge.labels(namespace, name).set(value)
        for labels in self._conditions.pop((namespace, name), []):
            _remove(self._condition, namespace, name, *labels)
        for labels in report.conditions:
            self._condition.labels(namespace, name, *labels).set(1)
        self._conditions[(namespace, name)] = list(report.conditions)

    def forget(self, namespace: str, name: str) -> None:
        """A FetchPool is gone: remove its series."""
        self.report(namespace, name, PoolReport())
        self._counters.forget(namespace, name)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (body, content type) the ``Accept`` header asks for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _Counters(prometheus_client.registry.Collector):
    """The per-FetchPool counters, as a collector: prometheus-client's ``Counter`` would add a
    ``_created`` series to each (prometheus-client offers only a process-wide switch for that)."""

    def __init__(self, helps: dict[str, str]) -> None:
        self._helps = helps
        self._values: dict[tuple[str, str, str], float] = {}

    def inc(self, name: str, namespace: str, fetchpool: str) -> None:
        self.know(namespace, fetchpool)
        self._values[(name, namespace, fetchpool)] += 1.0

    def know(self, namespace: str, fetchpool: str) -> None:
        """Export every counter of this FetchPool, at 0 until it counts something: a series that
        appears only with its first error is missed by rate() and by alerts on increase()."""
        for name in self._helps:
            self._values.setdefault((name, namespace, fetchpool), 0.0)

    def forget(self, namespace: str, fetchpool: str) -> None:
        for key in [k for k in self._values if k[1:] == (namespace, fetchpool)]:
            del self._values[key]

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, help_ in self._helps.items():
            family = CounterMetricFamily(PREFIX + name, help_, labels=LABELS)
            for (metric, namespace, fetchpool), value in sorted(self._values.items()):
                if metric == name:
                    family.add_metric([namespace, fetchpool], value)
            yield family


def _remove(metric: prometheus_client.metrics.MetricWrapperBase, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set
        metric.remove(*labels)


async def serve_metrics(health: Health, endpoint: str, *, ready: asyncio.Event | None = None) -> None:
    """Serve ``health``'s registry at ``endpoint`` (``http://host:port/path``) until cancelled."""
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme != "http" or parts.port is None:
        raise ValueError(f"metrics endpoint must look like http://host:port/path, got {endpoint!r}")

    async def metrics(request: aiohttp.web.Request) -> aiohttp.web.Response:
        body, content_type = health.render(request.headers.get("Accept"))
        return aiohttp.web.Response(body=body, headers={"Content-Type": content_type})

    app = aiohttp.web.Application()
    app.add_routes([aiohttp.web.get(parts.path or "/metrics", metrics)])
    runner = aiohttp.web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, parts.hostname or "0.0.0.0", parts.port)
    await site.start()
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.shield(runner.cleanup())
