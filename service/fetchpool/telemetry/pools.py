"""Pool snapshots for observable instruments, taken on the engine's event loop.

Metric collection runs on other threads (the periodic OTLP reader, the Prometheus
HTTP server). The pools belong to the event loop, so a collection asks the loop
for the snapshots and waits a bounded time; the result is cached briefly so the
dozen callbacks of one collection share one hop. Nothing here runs per fetch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Protocol

from fetchpool.engine import PoolSnapshot

logger = logging.getLogger(__name__)

#: Seconds a collection waits for the event loop before using the previous snapshots.
LOOP_WAIT = 1.0
#: Seconds snapshots are reused (covers every callback of one collection).
CACHE_SECONDS = 0.25


class SnapshotSource(Protocol):
    """What is read: ``Engine.snapshots``."""

    def snapshots(self) -> list[PoolSnapshot]: ...


class PoolReader:
    """Thread-safe access to the snapshots of an attached engine (empty until attached)."""

    def __init__(self) -> None:
        self._source: SnapshotSource | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._lock = threading.Lock()
        self._cached: list[PoolSnapshot] = []
        self._cached_at = -CACHE_SECONDS

    def attach(self, source: SnapshotSource) -> None:
        """Read ``source`` from now on; call it on the event loop that owns it (if one runs)."""
        try:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        except RuntimeError:
            self._loop = self._loop_thread = None
        self._source = source
        self._cached_at = -CACHE_SECONDS

    def snapshots(self) -> list[PoolSnapshot]:
        """The pools' snapshots now (or at most :data:`CACHE_SECONDS` old)."""
        source = self._source
        if source is None:
            return []
        with self._lock:
            now = time.monotonic()
            if now - self._cached_at < CACHE_SECONDS:
                return self._cached
            try:
                self._cached = self._take(source)
            except Exception as exc:  # a failing read must not break a collection
                logger.debug("pool snapshots unavailable: %r", exc)
                return self._cached
            self._cached_at = now
            return self._cached

    def _take(self, source: SnapshotSource) -> list[PoolSnapshot]:
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running() \
                or threading.get_ident() == self._loop_thread:
            return source.snapshots()
        future: concurrent.futures.Future[list[PoolSnapshot]] = concurrent.futures.Future()

        def take() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(source.snapshots())
                except Exception as exc:
                    future.set_exception(exc)

        loop.call_soon_threadsafe(take)
        try:
            return future.result(LOOP_WAIT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise
