"""Traces and metrics of fetchpool over OpenTelemetry, configured by the standard ``OTEL_*`` variables.

The engine knows nothing of this package: telemetry watches fetches through the engine's
:class:`~fetchpool.engine.FetchObserver` hook, reads pool snapshots, and watches gRPC calls
through a server interceptor. With nothing configured :func:`setup_telemetry` returns None,
imports no SDK, and a fetch pays one ``is None`` test. Names: :mod:`fetchpool.telemetry.names`
and ``README.md`` beside this file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fetchpool.telemetry.config import TelemetryConfig

if TYPE_CHECKING:
    from fetchpool.telemetry.setup import Telemetry

__all__ = ["Telemetry", "TelemetryConfig", "setup_telemetry"]


def setup_telemetry(listen: str = "127.0.0.1:0", env: Mapping[str, str] | None = None, *,
                    set_global: bool = True) -> Telemetry | None:
    """Telemetry as the environment asks, or None when it asks for none.

    ``listen`` is the gRPC listen address; the Prometheus endpoint (if any) binds its host unless
    ``OTEL_EXPORTER_PROMETHEUS_HOST`` says otherwise. ``set_global`` also installs the providers
    as OpenTelemetry's global ones. Raises :class:`~fetchpool.errors.ConfigError` for a malformed
    ``FETCHPOOL_METRICS_PORT`` or a Prometheus port that cannot be bound.
    """
    env = os.environ if env is None else env
    config = TelemetryConfig.from_env(env, listen.rsplit(":", 1)[0] if ":" in listen else listen)
    if not config.enabled:
        return None
    from fetchpool.telemetry.setup import build

    return build(config, env, set_global=set_global)


def __getattr__(name: str) -> object:
    if name == "Telemetry":
        from fetchpool.telemetry.setup import Telemetry

        return Telemetry
    raise AttributeError(name)
