"""Every span, metric and attribute name fetchpool emits, with units and bucket boundaries.

The single source of truth for ``telemetry/README.md`` (a test keeps the two in
step). Names follow the OpenTelemetry semantic conventions where they define
one (HTTP client spans and metrics, RPC v1.39+ names, ``tls.*``, ``k8s.*``);
fetchpool's own names live under ``fetchpool.`` and copy the shapes of the
``db.client.connection.*`` pool conventions (same instruments and units).
Semantic conventions checked: v1.44 (``rpc.response.status_code``).
"""

from __future__ import annotations

from dataclasses import dataclass

# --- attributes: OpenTelemetry semantic conventions --------------------------------------------
HTTP_REQUEST_METHOD = "http.request.method"
HTTP_REQUEST_METHOD_ORIGINAL = "http.request.method_original"
HTTP_REQUEST_RESEND_COUNT = "http.request.resend_count"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
HTTP_RESPONSE_BODY_SIZE = "http.response.body.size"
HTTP_CONNECTION_STATE = "http.connection.state"
URL_FULL = "url.full"
URL_SCHEME = "url.scheme"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
NETWORK_PROTOCOL_NAME = "network.protocol.name"
NETWORK_PROTOCOL_VERSION = "network.protocol.version"
ERROR_TYPE = "error.type"
TLS_NEXT_PROTOCOL = "tls.next_protocol"  # the negotiated ALPN protocol ("h2", "http/1.1")
TLS_PROTOCOL_NAME = "tls.protocol.name"
TLS_PROTOCOL_VERSION = "tls.protocol.version"
RPC_SYSTEM_NAME = "rpc.system.name"
RPC_METHOD = "rpc.method"  # fully qualified: "fetchpool.v1.FetchService/FetchMany"
RPC_RESPONSE_STATUS_CODE = "rpc.response.status_code"  # "OK", "CANCELLED", ...
# Pre-v1.39 RPC names, kept on spans (not metrics) for backends that still group by them.
RPC_SYSTEM_LEGACY = "rpc.system"
RPC_SERVICE_LEGACY = "rpc.service"
RPC_GRPC_STATUS_CODE_LEGACY = "rpc.grpc.status_code"

# --- attributes: fetchpool's own ---------------------------------------------------------------
#: The pool a fetch went through: "direct" or the proxy URL without credentials.
POOL_NAME = "fetchpool.pool.name"
#: The fetch's (last) request went over a pooled connection opened earlier.
CONNECTION_REUSED = "fetchpool.connection.reused"
#: Results a streaming RPC sent.
RPC_RESPONSES = "fetchpool.rpc.responses"
#: Which telemetry signal a drop counts (``traces`` or ``metrics``).
TELEMETRY_SIGNAL = "fetchpool.telemetry.signal"

CONNECTION_STATE_ACTIVE = "active"
CONNECTION_STATE_IDLE = "idle"

# --- resource attributes read from the environment (Kubernetes downward API) -------------------
#: resource attribute -> environment variables tried in order (the Helm chart sets the first).
K8S_RESOURCE_ENV: dict[str, tuple[str, ...]] = {
    "k8s.pod.name": ("K8S_POD_NAME", "POD_NAME"),
    "k8s.pod.uid": ("K8S_POD_UID", "POD_UID"),
    "k8s.namespace.name": ("K8S_NAMESPACE_NAME", "POD_NAMESPACE"),
    "k8s.node.name": ("K8S_NODE_NAME", "NODE_NAME"),
}
SERVICE_NAME_DEFAULT = "fetchpool"
INSTRUMENTATION_SCOPE = "fetchpool"

# --- spans -------------------------------------------------------------------------------------
#: How the phases of a fetch are exported (``FETCHPOOL_TRACE_PHASES``): span events on the fetch's
#: CLIENT span (the default, cheaper), child spans (a waterfall in trace views), or not at all.
PHASES_AS_EVENTS = "events"
PHASES_AS_SPANS = "spans"
PHASES_OFF = "none"
PHASE_MODES = (PHASES_AS_EVENTS, PHASES_AS_SPANS, PHASES_OFF)
#: Event attribute: the phase's duration in seconds (an event has a time, not a duration).
PHASE_DURATION = "fetchpool.phase.duration"
#: Event attribute: the phase failed (a child span has an ERROR status instead).
PHASE_FAILED = "fetchpool.phase.failed"
#: Phase name (``fetchpool.engine.phases``) -> child span or event name. Others keep their name.
PHASE_SPANS: dict[str, str] = {
    "pool.acquire": "pool.acquire",
    "connect": "tcp.connect",
    "proxy.connect": "proxy.connect",
    "tls": "tls.handshake",
    "request.send": "request.send",
    "response.headers": "response.headers",
    "response.body": "response.body",
}
#: Phase attribute -> span attribute (others are passed through, prefixed ``fetchpool.`` when bare).
PHASE_ATTRIBUTES: dict[str, str] = {
    "pool": POOL_NAME,
    "tls.alpn": TLS_NEXT_PROTOCOL,
    "tls.protocol.version": TLS_PROTOCOL_VERSION,
    "size": HTTP_RESPONSE_BODY_SIZE,
}
#: The name of a fetch's CLIENT span when its method is not a known one (semantic conventions).
SPAN_NAME_OTHER_METHOD = "HTTP"
#: HTTP methods the conventions know; others are reported as ``_OTHER``.
KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"})
#: gRPC services that get no span and no metric (probes and tooling, not work).
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
#: gRPC codes that mark a SERVER span as an error (RPC conventions, gRPC section).
SERVER_ERROR_CODES = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                                "DATA_LOSS"})


# --- metrics -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MetricName:
    """One instrument: its name, kind, unit, attributes and meaning (a row of the README table)."""

    name: str
    instrument: str
    unit: str
    attributes: tuple[str, ...]
    description: str
    convention: str = ""  # the semantic convention it follows or mirrors

    @property
    def prometheus(self) -> str:
        """The name the Prometheus exporters give it (dots to ``_``, unit suffix, ``_total``)."""
        base = self.name.replace(".", "_")
        unit = {"s": "seconds", "By": "bytes"}.get(self.unit, "")
        if unit and not base.endswith("_" + unit):
            base += "_" + unit
        if self.instrument in ("Counter", "ObservableCounter"):
            base += "_total"
        return base


_POOL = (POOL_NAME,)

HTTP_CLIENT_REQUEST_DURATION = MetricName(
    "http.client.request.duration", "Histogram", "s",
    (HTTP_REQUEST_METHOD, HTTP_RESPONSE_STATUS_CODE, ERROR_TYPE, NETWORK_PROTOCOL_VERSION, URL_SCHEME, POOL_NAME),
    "Duration of a whole fetch (pool wait, every attempt and redirect, body read)", "HTTP client (stable)")
HTTP_CLIENT_ACTIVE_REQUESTS = MetricName(
    "http.client.active_requests", "ObservableUpDownCounter", "{request}", _POOL,
    "Requests in flight through the pool now (admitted, not waiting)", "HTTP client")
HTTP_CLIENT_OPEN_CONNECTIONS = MetricName(
    "http.client.open_connections", "ObservableUpDownCounter", "{connection}", (HTTP_CONNECTION_STATE, POOL_NAME),
    "Open connections of the pool now, by state (active, idle)", "HTTP client")
HTTP_CLIENT_CONNECTION_DURATION = MetricName(
    "http.client.connection.duration", "Histogram", "s", (NETWORK_PROTOCOL_VERSION, POOL_NAME),
    "Lifetime of a closed connection that lived through at least one pool upkeep (once a second)", "HTTP client")
POOL_CONNECTION_MAX = MetricName(
    "fetchpool.pool.connection.max", "ObservableUpDownCounter", "{connection}", _POOL,
    "Connections the pool may open (the limit the operator sets)", "db.client.connection.max")
POOL_CONNECTION_IDLE_MAX = MetricName(
    "fetchpool.pool.connection.idle.max", "ObservableUpDownCounter", "{connection}", _POOL,
    "Idle connections the pool may keep", "db.client.connection.idle.max")
POOL_PENDING_REQUESTS = MetricName(
    "fetchpool.pool.pending_requests", "ObservableUpDownCounter", "{request}", _POOL,
    "Requests waiting for a connection of the pool now", "db.client.connection.pending_requests")
POOL_WAIT_TIME = MetricName(
    "fetchpool.pool.wait_time", "Histogram", "s", _POOL,
    "Time a request attempt waited to get a connection of the pool", "db.client.connection.wait_time")
POOL_TIMEOUTS = MetricName(
    "fetchpool.pool.timeouts", "ObservableCounter", "{timeout}", _POOL,
    "Requests that gave up waiting for a connection (POOL_TIMEOUT)", "db.client.connection.timeouts")
POOL_CONNECTION_CREATE_TIME = MetricName(
    "fetchpool.pool.connection.create_time", "Histogram", "s", (NETWORK_PROTOCOL_VERSION, POOL_NAME),
    "Time to open a connection: TCP connect, proxy CONNECT and TLS", "db.client.connection.create_time")
POOL_CONNECTIONS_CREATED = MetricName(
    "fetchpool.pool.connection.created", "ObservableCounter", "{connection}", _POOL,
    "Connections the pool has opened", "")
POOL_HTTP2_STREAMS = MetricName(
    "fetchpool.pool.http2.active_streams", "ObservableUpDownCounter", "{stream}", _POOL,
    "HTTP/2 streams open on the pool's connections now", "")
POOL_WORKING_LIMIT = MetricName(
    "fetchpool.pool.working_limit", "ObservableUpDownCounter", "{request}", _POOL,
    "Requests the pool admits at once right now (below the max while dynamic sizing holds it back)", "")
POOL_RETRIES = MetricName(
    "fetchpool.pool.retries", "ObservableCounter", "{retry}", _POOL,
    "Requests sent again through the pool (retry policy, stale connection)", "")
POOL_CONNECTIONS_RETIRED = MetricName(
    "fetchpool.pool.connection.retired", "ObservableCounter", "{connection}", _POOL,
    "Connections the pool closed itself: max requests or max age reached, idle past the keep-alive expiry or "
    "over the idle limit, orphaned", "")
POOL_PROXY_EJECTED = MetricName(
    "fetchpool.pool.proxy.ejected", "ObservableUpDownCounter", "{pool}", _POOL,
    "1 while the pool's proxy is ejected after consecutive failures, else 0", "")
DEMAND = MetricName(
    "fetchpool.demand.requests", "ObservableUpDownCounter", "{request}", (),
    "Requests in flight plus waiting, summed over the pools: the per-pod autoscaling signal", "")
RPC_SERVER_CALL_DURATION = MetricName(
    "rpc.server.call.duration", "Histogram", "s", (RPC_SYSTEM_NAME, RPC_METHOD, RPC_RESPONSE_STATUS_CODE),
    "Duration of a gRPC call, the whole stream for streaming calls", "RPC server (v1.39+)")
TELEMETRY_DROPPED = MetricName(
    "fetchpool.telemetry.dropped", "Counter", "{item}", (TELEMETRY_SIGNAL, ERROR_TYPE),
    "Spans or metric batches dropped: export queue full (queue_full) or export failed (export_failed)", "")

METRICS: tuple[MetricName, ...] = (
    HTTP_CLIENT_REQUEST_DURATION,
    HTTP_CLIENT_ACTIVE_REQUESTS,
    HTTP_CLIENT_OPEN_CONNECTIONS,
    HTTP_CLIENT_CONNECTION_DURATION,
    POOL_CONNECTION_MAX,
    POOL_CONNECTION_IDLE_MAX,
    POOL_PENDING_REQUESTS,
    POOL_WAIT_TIME,
    POOL_TIMEOUTS,
    POOL_CONNECTION_CREATE_TIME,
    POOL_CONNECTIONS_CREATED,
    POOL_HTTP2_STREAMS,
    POOL_WORKING_LIMIT,
    POOL_RETRIES,
    POOL_CONNECTIONS_RETIRED,
    POOL_PROXY_EJECTED,
    DEMAND,
    RPC_SERVER_CALL_DURATION,
    TELEMETRY_DROPPED,
)

# Histogram bucket boundaries, seconds. The HTTP and RPC ones are the conventions' advisory
# boundaries extended for fetches and batches that run longer than 10 s.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
RPC_DURATION_BUCKETS = (*DURATION_BUCKETS, 120.0, 300.0, 600.0)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CREATE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONNECTION_DURATION_BUCKETS = (0.1, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def metric_table(metrics: tuple[MetricName, ...] = METRICS) -> str:
    """The README's metrics table, in Markdown."""
    rows = ["| metric | instrument | unit | attributes | Prometheus | meaning | convention |",
            "|---|---|---|---|---|---|---|"]
    for m in metrics:
        attributes = ", ".join(f"`{a}`" for a in m.attributes) or "none"
        rows.append(f"| `{m.name}` | {m.instrument} | `{m.unit}` | {attributes} | `{m.prometheus}` | "
                    f"{m.description} | {m.convention} |")
    return "\n".join(rows)
