"""Which exporters run, read from the standard ``OTEL_*`` variables (and ``FETCHPOOL_METRICS_PORT``).

No SDK import here: with nothing configured, telemetry costs this module and one ``is None`` test
per fetch. The rules, per signal:

- ``OTEL_SDK_DISABLED=true``: no traces and no pushed metrics, whatever else is set.
- ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` (comma-separated ``otlp``, ``console``,
  ``none``; metrics also ``prometheus``) choose explicitly.
- Unset, a signal is exported over OTLP when an endpoint is configured for it
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT``), else not at all.
- ``OTEL_EXPORTER_OTLP_{TRACES_,METRICS_,}PROTOCOL``: ``grpc`` (default) or ``http/protobuf``.
- The Prometheus endpoint serves when ``FETCHPOOL_METRICS_PORT`` is a port (the Helm chart's switch,
  honoured even with ``OTEL_SDK_DISABLED=true``: the autoscaler reads it), or when
  ``OTEL_METRICS_EXPORTER`` names ``prometheus`` (port ``OTEL_EXPORTER_PROMETHEUS_PORT``, default 9464).
  It listens on ``OTEL_EXPORTER_PROMETHEUS_HOST``, default the gRPC listen host.
- ``FETCHPOOL_TRACE_PHASES``: how a fetch's phases are exported: ``events`` (default, span events
  on the fetch's CLIENT span), ``spans`` (child spans: richer, costlier) or ``none``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from fetchpool.errors import ConfigError
from fetchpool.telemetry import names as n

logger = logging.getLogger(__name__)

METRICS_PORT_ENV = "FETCHPOOL_METRICS_PORT"
TRACE_PHASES_ENV = "FETCHPOOL_TRACE_PHASES"
PROMETHEUS_DEFAULT_PORT = 9464
PROTOCOLS = ("grpc", "http/protobuf")
_TRACE_EXPORTERS = ("otlp", "console")
_METRIC_EXPORTERS = ("otlp", "console", "prometheus")


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _names(env: Mapping[str, str], variable: str, known: tuple[str, ...]) -> tuple[str, ...] | None:
    raw = env.get(variable, "").strip()
    if not raw:
        return None
    names = []
    for name in (part.strip().lower() for part in raw.split(",")):
        if name in ("", "none"):
            continue
        if name not in known:
            logger.warning("%s: exporter %r is not supported here (%s); ignored", variable, name, ", ".join(known))
            continue
        if name not in names:
            names.append(name)
    return tuple(names)


def _protocol(env: Mapping[str, str], signal: str) -> str:
    for variable in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = env.get(variable, "").strip().lower()
        if value:
            if value in PROTOCOLS:
                return value
            logger.warning("%s=%s is not supported (%s); using grpc", variable, value, ", ".join(PROTOCOLS))
            return "grpc"
    return "grpc"


def _port(env: Mapping[str, str], variable: str, default: int) -> int:
    raw = env.get(variable, "").strip()
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"{variable}: not a port number: {raw!r}") from None
    if not 0 <= port < 65536:
        raise ConfigError(f"{variable}: port {port} is out of range")
    return port


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """What to export. ``*_exporters`` hold ``otlp``/``console``; ``prometheus_port`` 0 = no endpoint."""

    trace_exporters: tuple[str, ...] = ()
    metric_exporters: tuple[str, ...] = ()
    trace_protocol: str = "grpc"
    metric_protocol: str = "grpc"
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int = 0
    trace_phases: str = n.PHASES_AS_EVENTS

    @property
    def traces(self) -> bool:
        return bool(self.trace_exporters)

    @property
    def metrics(self) -> bool:
        return bool(self.metric_exporters or self.prometheus_port)

    @property
    def enabled(self) -> bool:
        return self.traces or self.metrics

    @classmethod
    def from_env(cls, env: Mapping[str, str], listen_host: str = "127.0.0.1") -> TelemetryConfig:
        """Read ``env`` (see the module docstring). Raises ConfigError for a malformed port."""
        disabled = _true(env.get("OTEL_SDK_DISABLED"))
        endpoint = bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip())
        traces = _names(env, "OTEL_TRACES_EXPORTER", _TRACE_EXPORTERS)
        if traces is None:
            traces = ("otlp",) if endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() else ()
        metrics = _names(env, "OTEL_METRICS_EXPORTER", _METRIC_EXPORTERS)
        if metrics is None:
            metrics = ("otlp",) if endpoint or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip() else ()
        port = _port(env, METRICS_PORT_ENV, 0)
        if not port and "prometheus" in metrics and not disabled:
            port = _port(env, "OTEL_EXPORTER_PROMETHEUS_PORT", PROMETHEUS_DEFAULT_PORT)
        host = env.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip() or listen_host or "127.0.0.1"
        phases = env.get(TRACE_PHASES_ENV, "").strip().lower() or n.PHASES_AS_EVENTS
        if phases not in n.PHASE_MODES:
            raise ConfigError(f"{TRACE_PHASES_ENV}: expected one of {', '.join(n.PHASE_MODES)}, got {phases!r}")
        if disabled:
            traces = metrics = ()
        return cls(
            trace_exporters=traces,
            metric_exporters=tuple(m for m in metrics if m != "prometheus"),
            trace_protocol=_protocol(env, "TRACES"),
            metric_protocol=_protocol(env, "METRICS"),
            prometheus_host=host.strip("[]"),
            prometheus_port=port,
            trace_phases=phases,
        )
