"""Operator health: counters, the age of the last watch event, and a Prometheus ``/metrics`` endpoint.

Exposed metrics (Prometheus text format 0.0.4, ``--metrics http://0.0.0.0:9090/metrics``):

- ``fetchpool_operator_seconds_since_last_event`` (gauge, seconds): since the last watch event of
  any watched kind (FetchPool, HPA, Deployment, Pod). kopf re-lists after every watch restart
  (``server_timeout``, ``410 Gone``, inactivity), and every listed object counts as an event, so a
  value far above the watch timeout means the watches are stuck; the liveness probe then fails.
- ``fetchpool_operator_events_total`` (counter), ``fetchpool_operator_reconciles_total``,
  ``fetchpool_operator_reconcile_errors_total``, ``fetchpool_operator_delivery_failures_total``
  (counters), ``fetchpool_operator_last_reconcile_duration_seconds`` (gauge, seconds).

The liveness endpoint itself is kopf's (``--liveness``); :meth:`Health.probe` is its probe.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Callable

import aiohttp.web

__all__ = ["Health", "serve_metrics"]


class Health:
    """Counters and timestamps (monotonic seconds) shared by the handlers and the reconciler."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_silence_seconds: float = 600.0) -> None:
        self._clock = clock
        self.started = clock()
        self.last_event: float | None = None
        self.max_silence_seconds = max_silence_seconds
        self.events_total = 0
        self.reconciles_total = 0
        self.reconcile_errors_total = 0
        self.delivery_failures_total = 0
        self.last_reconcile_duration = 0.0
        self.watched_pools = 0

    def event(self) -> None:
        """Record one watch event."""
        self.events_total += 1
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

    def render(self) -> str:
        """Prometheus text exposition."""
        rows = [
            (
                "fetchpool_operator_seconds_since_last_event",
                "gauge",
                "Seconds since the last watch event of any watched kind.",
                self.seconds_since_last_event(),
            ),
            ("fetchpool_operator_events_total", "counter", "Watch events seen.", self.events_total),
            (
                "fetchpool_operator_reconciles_total",
                "counter",
                "Reconciliation rounds run.",
                self.reconciles_total,
            ),
            (
                "fetchpool_operator_reconcile_errors_total",
                "counter",
                "Reconciliation rounds that failed (API errors).",
                self.reconcile_errors_total,
            ),
            (
                "fetchpool_operator_delivery_failures_total",
                "counter",
                "Pods that did not accept limits (per attempt).",
                self.delivery_failures_total,
            ),
            (
                "fetchpool_operator_last_reconcile_duration_seconds",
                "gauge",
                "Duration of the last reconciliation round, seconds.",
                self.last_reconcile_duration,
            ),
            ("fetchpool_operator_fetchpools", "gauge", "FetchPool objects known.", self.watched_pools),
        ]
        out: list[str] = []
        for name, kind, help_, value in rows:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {float(value):.6g}"]
        return "\n".join(out) + "\n"


async def serve_metrics(health: Health, endpoint: str, *, ready: asyncio.Event | None = None) -> None:
    """Serve ``health.render()`` at ``endpoint`` (``http://host:port/path``) until cancelled."""
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme != "http" or parts.port is None:
        raise ValueError(f"metrics endpoint must look like http://host:port/path, got {endpoint!r}")

    async def metrics(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(text=health.render(), content_type="text/plain", charset="utf-8")

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
