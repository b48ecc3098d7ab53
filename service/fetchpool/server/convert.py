"""Protobuf <-> engine objects, at the edge of the gRPC layer."""

from __future__ import annotations

from fetchpool import charset
from fetchpool.config import PoolLimits
from fetchpool.engine import FetchSpec, Outcome, PoolSnapshot
from fetchpool.v1 import fetch_pb2 as pb

#: The most characters of a request's URL a result echoes: httpx's longest URL; a longer one is
#: INVALID_URL, and echoing all of it could make the result larger than any message the caller
#: accepts (a 5 MB URL ended the whole call, losing the batch's other results).
MAX_URL_ECHO = 65536


def spec_from_proto(request: pb.FetchRequest) -> FetchSpec:
    """A FetchSpec; values are checked by the engine (so a bad one fails its item only)."""
    timeout = None
    if request.HasField("timeout") and (request.timeout.seconds or request.timeout.nanos):
        # Plain arithmetic: ToTimedelta() overflows on absurd values and would fail the whole call.
        timeout = request.timeout.seconds + request.timeout.nanos / 1e9
    return FetchSpec(
        url=request.url,
        method=request.method or "GET",
        headers=[(h.name, h.value) for h in request.headers],
        body=request.body,
        timeout=timeout,
        follow_redirects=request.follow_redirects if request.HasField("follow_redirects") else None,
        max_body_bytes=request.max_body_bytes,
        session_key=request.session_key,
        tls_insecure_skip_verify=request.tls_insecure_skip_verify,
        keep_cookies=request.keep_cookies,
    )


def _content_type(outcome: Outcome) -> str | None:
    return next((value for name, value in outcome.headers if name.lower() == "content-type"), None)


def result_to_proto(outcome: Outcome, request_id: str, index: int, *, include_text: bool = False) -> pb.FetchResult:
    """The FetchResult of one outcome (one message, however large: see ``server.parts``).

    ``encoding`` is determined for every response (``fetchpool.charset``); ``text`` is filled
    only when ``include_text`` asks for it. Sub-messages are built in place (``add``, a dict for
    ``timings``): a ``pb.Header`` per header, then copied into the result, cost twice as much.
    """
    t = outcome.timings
    result = pb.FetchResult(
        id=request_id,
        index=index,
        url=outcome.url[:MAX_URL_ECHO],
        final_url=outcome.final_url,
        status_code=outcome.status_code,
        body=outcome.body,
        http_version=outcome.http_version,
        connection_reused=outcome.connection_reused,
        timings={"pool_wait_seconds": t.pool_wait, "connect_seconds": t.connect,
                 "proxy_connect_seconds": t.proxy_connect, "tls_seconds": t.tls, "ttfb_seconds": t.ttfb,
                 "total_seconds": t.total},
        pool=outcome.pool,
        attempts=outcome.attempts,
        body_size=len(outcome.body),
        remote_address=outcome.remote_address,
        tls_version=outcome.tls_version,
        content_decoded=outcome.content_decoded,
        retry_reasons=outcome.retry_reasons,
    )
    add_header = result.headers.add
    for name, value in outcome.headers:
        add_header(name=name, value=value)
    if outcome.redirects:
        add_redirect = result.redirects.add
        for url, status in outcome.redirects:
            add_redirect(url=url, status_code=status)
    if outcome.error_kind is not None:
        result.error.kind = int(outcome.error_kind)  # type: ignore[assignment]
        result.error.message = outcome.error_message
    elif outcome.status_code:
        result.encoding = charset.detect(_content_type(outcome), outcome.body)
        if include_text and result.encoding:
            result.text = charset.decode(outcome.body, result.encoding)
    return result


def limits_to_proto(limits: PoolLimits) -> pb.PoolLimits:
    """The PoolLimits message of limits in force."""
    message = pb.PoolLimits(
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        max_connections_per_host=limits.max_connections_per_host,
        max_requests=limits.max_requests,
    )
    message.keepalive_expiry.FromNanoseconds(round(limits.keepalive_expiry * 1e9))
    message.pool_timeout.FromNanoseconds(round(limits.pool_timeout * 1e9))
    return message


def limit_changes(message: pb.PoolLimits) -> dict[str, float | int]:
    """The fields set in a SetPoolLimits message, as PoolLimits keyword arguments."""
    changes: dict[str, float | int] = {}
    for name in ("max_connections", "max_keepalive_connections", "max_connections_per_host", "max_requests"):
        if message.HasField(name):
            changes[name] = getattr(message, name)
    for name in ("keepalive_expiry", "pool_timeout"):
        if message.HasField(name):
            changes[name] = getattr(message, name).ToNanoseconds() / 1e9
    return changes


def stats_to_proto(s: PoolSnapshot) -> pb.PoolStats:
    """The PoolStats message of one snapshot."""
    message = pb.PoolStats(
        pool=s.pool,
        limits=limits_to_proto(s.limits),
        connections_open=s.connections_open,
        connections_idle=s.connections_idle,
        connections_active=s.connections_active,
        http2_streams=s.http2_streams,
        requests_active=s.requests_active,
        requests_waiting=s.requests_waiting,
        connections_created_total=s.connections_created_total,
        requests_total=s.requests_total,
        reuse_ratio=s.reuse_ratio,
        acquire_wait_p50_seconds=s.acquire_wait_p50,
        acquire_wait_p90_seconds=s.acquire_wait_p90,
        acquire_wait_p99_seconds=s.acquire_wait_p99,
        pool_timeouts_total=s.pool_timeouts_total,
        working_limit=s.working_limit,
        latency_mean_seconds=s.latency_mean,
        processing_mean_seconds=s.processing_mean,
        concurrency_mean=s.concurrency_mean,
        ejected=s.ejected,
        consecutive_failures=s.consecutive_failures,
        retries_total=s.retries_total,
        connections_retired_total=s.connections_retired_total,
    )
    if s.ejected:
        message.ejected_until.FromNanoseconds(round(s.ejected_until * 1e9))
    return message
