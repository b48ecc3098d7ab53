"""How observers (telemetry) watch the engine without driving it.

With no observer the hot path pays one ``is None`` test per fetch.
"""

from __future__ import annotations

from typing import Protocol

from fetchpool.engine.model import FetchSpec, Outcome
from fetchpool.engine.phases import PhaseRecorder


class FetchObserver(Protocol):
    """Told of every fetch: once when it starts, once when it ends (with its phases)."""

    def fetch_started(self, spec: FetchSpec) -> object:
        """Called in the caller's context (so a span can take the current one as parent);
        returns a token handed back to :meth:`fetch_finished`."""

    def fetch_finished(self, token: object, outcome: Outcome, recorder: PhaseRecorder | None) -> None:
        """Called once per fetch; ``recorder`` is None when the fetch never reached a pool."""

    def connection_closed(self, pool: str, lifetime: float, http_version: str) -> None:
        """A pooled connection of ``pool`` closed after ``lifetime`` seconds (from when the
        pool's upkeep first saw it open, so within a second of its real opening)."""

    def flush(self) -> None:
        """Called by the engine's per-second upkeep and when the engine closes: deliver whatever
        the observer holds back (it may batch its work)."""
