"""Settings: small frozen objects, read from flags and ``FETCHPOOL_*`` variables.

Every option is declared once in :data:`OPTIONS` (flag, environment variable,
type, default, help); the CLI and the README's configuration table come from it.
A flag beats its environment variable, which beats the embedded default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fetchpool.addresses import split_host_port
from fetchpool.errors import ConfigError, InvalidLimits

__all__ = [
    "OPTIONS",
    "FetchSettings",
    "Option",
    "PoolLimits",
    "PoolPolicy",
    "RetryPolicy",
    "ServerSettings",
    "Settings",
    "Timeouts",
    "add_arguments",
    "load_limits_file",
    "settings_from_args",
]

#: The HTTP engines a pool can run on (``fetchpool.engine.transports``; README "Transports").
TRANSPORTS = ("httpcore", "curl")
#: Limits above these are refused as absurd (a typo, not a wish).
MAX_CONNECTIONS_CEILING = 100_000
MAX_SECONDS = 24 * 3600.0
#: Requests in flight per connection that ``max_requests = 0`` allows: HTTP/2's usual
#: SETTINGS_MAX_CONCURRENT_STREAMS (100 is what RFC 9113 recommends as the least, and what
#: fetchpool's HTTP/2 client opens at most per connection).
REQUESTS_PER_CONNECTION = 100
MAX_REQUESTS_CEILING = MAX_CONNECTIONS_CEILING * REQUESTS_PER_CONNECTION


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolLimits:
    """Limits of one connection pool; the words are httpx's (``httpx.Limits``, ``httpx.Timeout.pool``)
    and Envoy's (its circuit breaker's ``max_requests``).

    - ``max_connections``: open connections at most (sockets: what a proxy provider sells and the
      operator divides). Over HTTP/1.1 each request in flight holds one; over HTTP/2 a connection
      carries as many as the server's SETTINGS_MAX_CONCURRENT_STREAMS allows.
    - ``max_requests``: requests in flight through the pool at most, whatever connections carry
      them; 0 = ``max_connections`` x :data:`REQUESTS_PER_CONNECTION`, following it when it changes.
    - ``max_keepalive_connections``: idle connections kept open at most (<= ``max_connections``).
    - ``keepalive_expiry``: seconds an idle connection is kept.
    - ``pool_timeout``: seconds a request may wait for a connection before POOL_TIMEOUT.
    - ``max_connections_per_host``: requests in flight to one origin at most; 0 = no cap
      (Go's ``Transport.MaxConnsPerHost``).

    Raises :class:`~fetchpool.errors.InvalidLimits` when built with invalid values.
    """

    max_connections: int = 100
    max_keepalive_connections: int = 100
    keepalive_expiry: float = 5.0
    pool_timeout: float = 30.0
    max_connections_per_host: int = 0
    max_requests: int = 0

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        if not 1 <= self.max_connections <= MAX_CONNECTIONS_CEILING:
            problems.append(("max_connections",
                             f"max_connections must be in 1..{MAX_CONNECTIONS_CEILING}, got {self.max_connections}"))
        if not 0 <= self.max_keepalive_connections <= self.max_connections:
            problems.append(("max_keepalive_connections",
                             "max_keepalive_connections must be in 0..max_connections "
                             f"({self.max_connections}), got {self.max_keepalive_connections}"))
        if not 0 <= self.max_requests <= MAX_REQUESTS_CEILING:
            problems.append(("max_requests",
                             f"max_requests must be in 0..{MAX_REQUESTS_CEILING} (0: max_connections x "
                             f"{REQUESTS_PER_CONNECTION}), got {self.max_requests}"))
        if not 0 <= self.max_connections_per_host <= self.max_connections:
            problems.append(("max_connections_per_host",
                             "max_connections_per_host must be in 0..max_connections "
                             f"({self.max_connections}), got {self.max_connections_per_host}"))
        for name in ("keepalive_expiry", "pool_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
                problems.append((name, f"{name} must be in (0, {MAX_SECONDS:.0f}] seconds, got {value}"))
        if problems:
            raise InvalidLimits("; ".join(text for _, text in problems), fields=tuple(problems))

    @property
    def requests_cap(self) -> int:
        """Requests in flight through the pool at most: ``max_requests``, or what 0 stands for."""
        return self.max_requests or self.max_connections * REQUESTS_PER_CONNECTION

    def replace(self, **changes: Any) -> PoolLimits:
        """A copy with ``changes`` applied; raises InvalidLimits if the result is invalid.

        When ``max_connections`` shrinks and ``max_keepalive_connections`` /
        ``max_connections_per_host`` are not among ``changes``, they are clamped
        to it; values given explicitly are checked as given.
        """
        ceiling = changes.get("max_connections", self.max_connections)
        for dependent in ("max_keepalive_connections", "max_connections_per_host"):
            if dependent not in changes and isinstance(ceiling, int):
                changes[dependent] = min(getattr(self, dependent), ceiling)
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeouts:
    """Seconds. ``connect``/``read``/``write`` are httpx's per-operation timeouts;
    ``request`` is the default total time of one fetch (all attempts and redirects)
    and ``max_request`` the largest a caller may ask for."""

    connect: float = 10.0
    read: float = 30.0
    write: float = 30.0
    request: float = 60.0
    max_request: float = 3600.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
                raise ConfigError(f"timeout {f.name} must be in (0, {MAX_SECONDS:.0f}] seconds, got {value}")
        if self.request > self.max_request:
            raise ConfigError("the default request timeout exceeds max_request")


@dataclass(frozen=True, kw_only=True, slots=True)
class FetchSettings:
    """How fetches run: sizes in bytes, counts in items.

    ``proxies`` are forward-proxy URLs (``http://user:pass@host:port``,
    ``socks5://...``), one pool each; empty means direct. ``proxy_policy``
    picks a proxy per request: ``round_robin``, ``least_busy`` or ``sticky``.
    ``ssrf_guard`` refuses non-global addresses unless ``allow_targets`` (CIDRs or
    host patterns) allows them; ``deny_targets`` are refused always (see
    ``fetchpool.engine.guard``). Responses over ``max_header_bytes`` or
    ``max_header_count`` are TOO_LARGE; ``max_fetches`` caps the fetches in flight
    or waiting in the whole process.
    """

    proxies: tuple[str, ...] = field(default=(), repr=False)  # may hold credentials
    proxy_policy: str = "round_robin"
    max_body_bytes: int = 10 * 1024 * 1024
    follow_redirects: bool = True
    max_redirects: int = 10
    batch_concurrency: int = 64
    max_batch_concurrency: int = 1024
    max_batch_size: int = 100_000
    ca_bundle: str | None = None
    ssrf_guard: bool = True
    allow_targets: tuple[str, ...] = ()
    deny_targets: tuple[str, ...] = ()
    max_header_bytes: int = 65_536
    max_header_count: int = 256
    max_fetches: int = 10_000
    transport: str = "httpcore"

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"unknown transport {self.transport!r} ({', '.join(TRANSPORTS)})")
        if self.proxy_policy not in ("round_robin", "least_busy", "sticky"):
            raise ConfigError(f"unknown proxy policy {self.proxy_policy!r} (round_robin, least_busy, sticky)")
        if self.max_body_bytes < 1:
            raise ConfigError("max_body_bytes must be positive")
        if not 1 <= self.batch_concurrency <= self.max_batch_concurrency:
            raise ConfigError("batch_concurrency must be in 1..max_batch_concurrency")
        if self.max_batch_size < 1 or self.max_redirects < 0:
            raise ConfigError("max_batch_size must be positive and max_redirects not negative")
        if min(self.max_header_bytes, self.max_header_count, self.max_fetches) < 1:
            raise ConfigError("max_header_bytes, max_header_count and max_fetches must be positive")
        if self.ca_bundle and not os.path.isfile(self.ca_bundle):
            raise ConfigError(f"CA bundle {self.ca_bundle!r} is not a file")


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """Retries of one fetch (after urllib3's ``Retry`` and Envoy's retry budget).

    - ``attempts``: attempts at most per fetch, the first included (1 = no retries).
    - Idempotent methods are retried on connect, proxy, reset and protocol errors
      and on ``statuses``; other methods only when the request never left (connect errors).
    - Back-off: full jitter, ``uniform(0, min(backoff_max, backoff_base * 2**retry))``
      seconds (AWS Architecture Blog, "Exponential Backoff And Jitter"), unless the
      response says ``Retry-After`` (seconds or HTTP-date); a ``Retry-After`` above
      ``max_retry_after`` seconds is not waited for (the response is returned).
    - Budget: retries in progress at most ``max(budget_min, budget_ratio * requests in
      flight)``, so a failing target cannot multiply the load (Envoy ``retry_budget``:
      ``budget_percent`` 20 %, ``min_retry_concurrency`` 3).
    """

    attempts: int = 3
    statuses: tuple[int, ...] = (429, 503)
    backoff_base: float = 0.1
    backoff_max: float = 10.0
    max_retry_after: float = 30.0
    budget_ratio: float = 0.2
    budget_min: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 20:
            raise ConfigError("retry attempts must be in 1..20")
        if not all(100 <= s <= 599 for s in self.statuses):
            raise ConfigError("retry statuses must be HTTP status codes")
        if not (0 <= self.backoff_base <= self.backoff_max <= MAX_SECONDS and self.max_retry_after >= 0):
            raise ConfigError("retry back-off must satisfy 0 <= base <= max")
        if not (0 <= self.budget_ratio <= 1 and self.budget_min >= 0):
            raise ConfigError("retry budget ratio must be in 0..1 and its minimum not negative")


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolPolicy:
    """Connection hygiene, proxy ejection, politeness and dynamic sizing.

    - ``max_requests_per_connection`` / ``max_connection_age`` (seconds): a connection that
      reaches either is retired: it takes no new request and closes once idle (Envoy's
      ``max_requests_per_connection`` / ``max_connection_duration``). 0 = no limit.
    - ``proxy_eject_failures`` consecutive proxy failures (refused or failed connect to the
      proxy, 407, 502/503/504 to CONNECT) eject a proxy's pool for ``proxy_eject_seconds``
      times the number of its ejections, at most 10 times (Envoy outlier detection:
      ``consecutive_gateway_failure``, ``base_ejection_time``). 0 failures = never eject.
    - ``host_rate``: requests per second per origin at most (0 = no limit).
    - ``dynamic``: each pool's working limit (requests admitted) follows demand between
      ``dynamic_floor`` and ``PoolLimits.max_requests`` (see ``fetchpool.engine.sizing``).
    """

    max_requests_per_connection: int = 0
    max_connection_age: float = 0.0
    proxy_eject_failures: int = 5
    proxy_eject_seconds: float = 30.0
    host_rate: float = 0.0
    dynamic: bool = False
    dynamic_floor: int = 4

    def __post_init__(self) -> None:
        if self.max_requests_per_connection < 0 or not 0 <= self.max_connection_age <= MAX_SECONDS:
            raise ConfigError("max requests per connection and max connection age must not be negative")
        if self.proxy_eject_failures < 0 or not 0 < self.proxy_eject_seconds <= MAX_SECONDS:
            raise ConfigError("proxy ejection needs failures >= 0 and seconds > 0")
        if not (0 <= self.host_rate <= 1e6 and self.dynamic_floor >= 1):
            raise ConfigError("host rate must be in 0..1e6 and the dynamic floor at least 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerSettings:
    """The gRPC side. Durations are seconds. ``max_connection_age`` (0 = none) recycles caller
    connections: calls still running on one go on until they end, or for at most
    ``max_connection_age_grace`` (0 = no limit). ``max_message_bytes`` bounds received
    messages, and result messages sent to callers that ask for more than gRPC's 4 MiB.

    Keepalive (gRPC core's names in brackets): the server pings a caller's connection after
    ``keepalive_time`` without activity (``grpc.keepalive_time_ms``; 0 = never) and closes it if
    no answer comes within ``keepalive_timeout``, so dead callers release their fetches; it
    accepts callers' pings every ``min_ping_interval`` at most
    (``grpc.http2.min_ping_interval_without_data_ms``; more often is a strike, two strikes give
    GOAWAY ``too_many_pings``), also on connections without calls when
    ``permit_keepalive_without_calls``. The defaults accept the 10 s client pings of gRPC's own
    keepalive example (and Go's floor), where gRPC's server defaults (5 minutes, no pings without
    calls) cut them.

    ``tls_cert`` and ``tls_key`` (PEM files) turn on TLS, ``tls_client_ca`` mutual TLS; a bearer
    token (``auth_token_file`` or ``auth_token``) is then required from callers, and
    ``admin_token_file``'s alone may change the service's state (``fetchpool.server.security``)."""

    listen: str = "127.0.0.1:50051"
    grace_period: float = 25.0
    max_connection_age: float = 0.0
    max_connection_age_grace: float = 0.0
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    min_ping_interval: float = 5.0
    permit_keepalive_without_calls: bool = True
    max_message_bytes: int = 64 * 1024 * 1024
    log_level: str = "INFO"
    event_loop: str = "uvloop"
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_token_file: str = ""
    auth_token: str = field(default="", repr=False)
    admin_token_file: str = ""

    def __post_init__(self) -> None:
        try:
            split_host_port(self.listen, ephemeral=True)
        except ValueError as exc:
            raise ConfigError(f"listen address: {exc}") from None
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ConfigError(f"event loop must be uvloop or asyncio, got {self.event_loop!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"log level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        for name in ("grace_period", "max_connection_age", "max_connection_age_grace", "keepalive_time",
                     "min_ping_interval"):
            if not 0 <= getattr(self, name) <= MAX_SECONDS:
                raise ConfigError(f"{name} must be in 0..86400 seconds, got {getattr(self, name)}")
        if not 0 < self.keepalive_timeout <= MAX_SECONDS:
            raise ConfigError(f"keepalive_timeout must be in (0, 86400] seconds, got {self.keepalive_timeout}")
        if self.max_message_bytes < 1024:
            raise ConfigError("max message bytes must be at least 1024")


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Everything ``fetchpool serve`` needs."""

    server: ServerSettings = field(default_factory=ServerSettings)
    limits: PoolLimits = field(default_factory=PoolLimits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    pool: PoolPolicy = field(default_factory=PoolPolicy)
    limits_file: str | None = None


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in _csv(text))


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: where it goes (``section.field``), its flag and variable, and its doc."""

    target: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str

    @property
    def default(self) -> Any:
        section, name = self.target.split(".")
        if section == "settings":
            return getattr(Settings(), name)
        return getattr(getattr(Settings(), section), name)


OPTIONS: tuple[Option, ...] = (
    Option("server.listen", "--listen", "FETCHPOOL_LISTEN", str,
           "gRPC listen address, host:port ([::]:port for IPv6; port 0 picks a free one)"),
    Option("limits.max_connections", "--max-connections", "FETCHPOOL_MAX_CONNECTIONS", int,
           "open connections per pool at most (over HTTP/2 each carries many requests)"),
    Option("limits.max_requests", "--max-requests", "FETCHPOOL_MAX_REQUESTS", int,
           "requests in flight per pool at most; 0 = max_connections x 100"),
    Option("limits.max_keepalive_connections", "--max-keepalive-connections",
           "FETCHPOOL_MAX_KEEPALIVE_CONNECTIONS", int, "idle connections kept per pool at most"),
    Option("limits.keepalive_expiry", "--keepalive-expiry", "FETCHPOOL_KEEPALIVE_EXPIRY", float,
           "seconds an idle connection is kept"),
    Option("limits.pool_timeout", "--pool-timeout", "FETCHPOOL_POOL_TIMEOUT", float,
           "seconds a request may wait for a pooled connection (then POOL_TIMEOUT)"),
    Option("limits.max_connections_per_host", "--max-connections-per-host",
           "FETCHPOOL_MAX_CONNECTIONS_PER_HOST", int, "requests in flight to one origin at most; 0 = no cap"),
    Option("timeouts.connect", "--connect-timeout", "FETCHPOOL_CONNECT_TIMEOUT", float,
           "seconds to open a connection (TCP, proxy CONNECT, TLS)"),
    Option("timeouts.read", "--read-timeout", "FETCHPOOL_READ_TIMEOUT", float, "seconds between two reads"),
    Option("timeouts.write", "--write-timeout", "FETCHPOOL_WRITE_TIMEOUT", float, "seconds between two writes"),
    Option("timeouts.request", "--request-timeout", "FETCHPOOL_REQUEST_TIMEOUT", float,
           "default total seconds per fetch (a request's own timeout overrides it)"),
    Option("timeouts.max_request", "--max-request-timeout", "FETCHPOOL_MAX_REQUEST_TIMEOUT", float,
           "largest per-request timeout accepted, seconds"),
    Option("fetch.proxies", "--proxy", "FETCHPOOL_PROXY", _csv,
           "forward proxies, comma-separated (http://user:pass@host:port, socks5://...); empty = direct"),
    Option("fetch.proxy_policy", "--proxy-policy", "FETCHPOOL_PROXY_POLICY", str,
           "proxy choice per request: round_robin, least_busy or sticky"),
    Option("fetch.batch_concurrency", "--batch-concurrency", "FETCHPOOL_BATCH_CONCURRENCY", int,
           "fetches in flight per FetchMany/FetchStream call by default"),
    Option("fetch.max_batch_concurrency", "--max-batch-concurrency", "FETCHPOOL_MAX_BATCH_CONCURRENCY", int,
           "largest per-call concurrency a caller may ask for"),
    Option("fetch.max_batch_size", "--max-batch-size", "FETCHPOOL_MAX_BATCH_SIZE", int,
           "requests per FetchMany call at most (more: RESOURCE_EXHAUSTED)"),
    Option("fetch.max_body_bytes", "--max-body-bytes", "FETCHPOOL_MAX_BODY_BYTES", int,
           "largest response body, bytes (decoded); more gives TOO_LARGE"),
    Option("fetch.follow_redirects", "--follow-redirects", "FETCHPOOL_FOLLOW_REDIRECTS", _bool,
           "follow redirects unless a request says otherwise"),
    Option("fetch.max_redirects", "--max-redirects", "FETCHPOOL_MAX_REDIRECTS", int, "redirects followed at most"),
    Option("fetch.ca_bundle", "--ca-bundle", "FETCHPOOL_CA_BUNDLE", str,
           "PEM file of CAs to trust instead of certifi's bundle"),
    Option("retry.attempts", "--retry-attempts", "FETCHPOOL_RETRY_ATTEMPTS", int,
           "attempts per fetch at most, the first included (1 = no retries)"),
    Option("retry.statuses", "--retry-statuses", "FETCHPOOL_RETRY_STATUSES", _ints,
           "HTTP statuses retried for idempotent requests, comma-separated"),
    Option("retry.backoff_base", "--retry-backoff-base", "FETCHPOOL_RETRY_BACKOFF_BASE", float,
           "seconds; retry n waits uniform(0, min(max, base * 2**n)) unless Retry-After says"),
    Option("retry.backoff_max", "--retry-backoff-max", "FETCHPOOL_RETRY_BACKOFF_MAX", float,
           "seconds; the back-off cap"),
    Option("retry.max_retry_after", "--max-retry-after", "FETCHPOOL_MAX_RETRY_AFTER", float,
           "seconds; a longer Retry-After is not waited for (the response is returned)"),
    Option("retry.budget_ratio", "--retry-budget", "FETCHPOOL_RETRY_BUDGET", float,
           "retries in progress at most this share of requests in flight (Envoy retry_budget)"),
    Option("pool.max_requests_per_connection", "--max-requests-per-connection",
           "FETCHPOOL_MAX_REQUESTS_PER_CONNECTION", int, "retire a connection after this many requests; 0 = never"),
    Option("pool.max_connection_age", "--max-connection-age", "FETCHPOOL_MAX_CONNECTION_AGE", float,
           "seconds; retire a connection this old; 0 = never"),
    Option("pool.proxy_eject_failures", "--proxy-eject-failures", "FETCHPOOL_PROXY_EJECT_FAILURES", int,
           "consecutive proxy failures that eject a proxy for a cool-down; 0 = never"),
    Option("pool.proxy_eject_seconds", "--proxy-eject-seconds", "FETCHPOOL_PROXY_EJECT_SECONDS", float,
           "seconds a proxy is ejected, times its ejection count (at most 10x)"),
    Option("pool.host_rate", "--host-rate", "FETCHPOOL_HOST_RATE", float,
           "requests per second per origin at most; 0 = no limit"),
    Option("pool.dynamic", "--dynamic-limits", "FETCHPOOL_DYNAMIC_LIMITS", _bool,
           "let each pool's working limit (requests admitted) follow demand between the floor and max_requests"),
    Option("pool.dynamic_floor", "--dynamic-floor", "FETCHPOOL_DYNAMIC_FLOOR", int,
           "the lowest working limit in dynamic mode"),
    Option("fetch.ssrf_guard", "--ssrf-guard", "FETCHPOOL_SSRF_GUARD", _bool,
           "refuse targets that resolve to loopback, private, link-local, ... addresses"),
    Option("fetch.allow_targets", "--allow-targets", "FETCHPOOL_ALLOW_TARGETS", _csv,
           "CIDRs and host patterns allowed despite the SSRF guard, comma-separated"),
    Option("fetch.deny_targets", "--deny-targets", "FETCHPOOL_DENY_TARGETS", _csv,
           "CIDRs and host patterns always refused (e.g. the cluster's service range)"),
    Option("fetch.max_header_bytes", "--max-header-bytes", "FETCHPOOL_MAX_HEADER_BYTES", int,
           "largest response header block, bytes; more gives TOO_LARGE"),
    Option("fetch.max_header_count", "--max-header-count", "FETCHPOOL_MAX_HEADER_COUNT", int,
           "most response header fields; more gives TOO_LARGE"),
    Option("fetch.max_fetches", "--max-fetches", "FETCHPOOL_MAX_FETCHES", int,
           "fetches in flight or waiting in the whole process at most"),
    Option("fetch.transport", "--transport", "FETCHPOOL_TRANSPORT", str,
           "HTTP engine under every pool: httpcore (httpx's own) or curl (libcurl); see Transports"),
    Option("server.grace_period", "--grace-period", "FETCHPOOL_GRACE_PERIOD", float,
           "seconds in-flight calls may run after SIGTERM before they are cancelled"),
    Option("server.max_connection_age", "--grpc-max-connection-age", "FETCHPOOL_GRPC_MAX_CONNECTION_AGE", float,
           "seconds before a caller's gRPC connection is recycled (so callers re-resolve); 0 = never"),
    Option("server.max_connection_age_grace", "--grpc-max-connection-age-grace",
           "FETCHPOOL_GRPC_MAX_CONNECTION_AGE_GRACE", float,
           "seconds calls still running on a recycled connection may go on; 0 = until they end"),
    Option("server.keepalive_time", "--grpc-keepalive-time", "FETCHPOOL_GRPC_KEEPALIVE_TIME", float,
           "seconds without activity before the server pings a caller's connection; 0 = never"),
    Option("server.keepalive_timeout", "--grpc-keepalive-timeout", "FETCHPOOL_GRPC_KEEPALIVE_TIMEOUT", float,
           "seconds to wait for the answer to that ping before closing the connection"),
    Option("server.min_ping_interval", "--grpc-min-ping-interval", "FETCHPOOL_GRPC_MIN_PING_INTERVAL", float,
           "seconds: shortest interval between a caller's keepalive pings accepted (more often: GOAWAY)"),
    Option("server.permit_keepalive_without_calls", "--grpc-permit-keepalive-without-calls",
           "FETCHPOOL_GRPC_PERMIT_KEEPALIVE_WITHOUT_CALLS", _bool,
           "accept keepalive pings on caller connections that have no call in flight"),
    Option("server.max_message_bytes", "--max-message-bytes", "FETCHPOOL_MAX_MESSAGE_BYTES", int,
           "largest gRPC message received, and largest result message sent when a caller asks for more"),
    Option("server.log_level", "--log-level", "FETCHPOOL_LOG_LEVEL", str, "DEBUG, INFO, WARNING or ERROR"),
    Option("server.event_loop", "--event-loop", "FETCHPOOL_EVENT_LOOP", str, "uvloop or asyncio"),
    Option("server.tls_cert", "--tls-cert", "FETCHPOOL_TLS_CERT", str, "PEM certificate chain: serve gRPC over TLS"),
    Option("server.tls_key", "--tls-key", "FETCHPOOL_TLS_KEY", str, "PEM private key of --tls-cert"),
    Option("server.tls_client_ca", "--tls-client-ca", "FETCHPOOL_TLS_CLIENT_CA", str,
           "PEM CA bundle: require client certificates it signed (mutual TLS)"),
    Option("server.auth_token_file", "--auth-token-file", "FETCHPOOL_AUTH_TOKEN_FILE", str,
           "file holding the bearer token(s) callers must send (health checks excepted); "
           "one per line, re-read when it changes"),
    Option("server.auth_token", "--auth-token", "FETCHPOOL_AUTH_TOKEN", str,
           "the bearer token itself (prefer the file: flags show in ps)"),
    Option("server.admin_token_file", "--admin-token-file", "FETCHPOOL_ADMIN_TOKEN_FILE", str,
           "file holding the bearer token(s) that alone may call PoolAdmin.SetPoolLimits (the operator's); "
           "one per line, re-read when it changes"),
    Option("settings.limits_file", "--limits-file", "FETCHPOOL_LIMITS_FILE", str,
           "JSON file of pool limits applied at start-up (written by the operator); ignored if absent"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every option of :data:`OPTIONS` to ``parser`` (defaults stay None: resolved later)."""
    for option in OPTIONS:
        switch: dict[str, Any] = {"nargs": "?", "const": "true"} if option.parse is _bool else {}  # `--flag` = true
        parser.add_argument(
            option.flag,
            dest=option.target.replace(".", "__"),
            default=None,
            metavar=option.env,
            help=f"{option.help} (env {option.env}, default {option.default!r})",
            **switch,
        )


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from parsed flags, then ``environ``, then defaults.

    Raises :class:`~fetchpool.errors.ConfigError` naming the flag or variable at fault.
    """
    env = os.environ if environ is None else environ
    sections: dict[str, dict[str, Any]] = {
        "server": {}, "limits": {}, "timeouts": {}, "fetch": {}, "retry": {}, "pool": {}, "settings": {}
    }
    for option in OPTIONS:
        raw = getattr(args, option.target.replace(".", "__"), None)
        source = option.flag
        if raw is None and env.get(option.env, "") != "":
            raw, source = env[option.env], option.env
        if raw is None:
            continue
        try:
            value = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        section, name = option.target.split(".")
        sections[section][name] = value
    try:
        return Settings(
            server=ServerSettings(**sections["server"]),
            limits=PoolLimits().replace(**sections["limits"]),
            timeouts=Timeouts(**sections["timeouts"]),
            fetch=FetchSettings(**sections["fetch"]),
            retry=RetryPolicy(**sections["retry"]),
            pool=PoolPolicy(**sections["pool"]),
            **sections["settings"],
        )
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def load_limits_file(path: str, base: PoolLimits) -> PoolLimits:
    """Limits from a JSON object of :class:`PoolLimits` fields applied on ``base``.

    A missing file returns ``base`` (the operator may not have written it yet).
    Raises :class:`~fetchpool.errors.ConfigError` for unreadable JSON, unknown
    fields or invalid limits.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return base
    except (OSError, ValueError) as exc:
        raise ConfigError(f"limits file {path}: {exc}") from None
    known = {f.name for f in dataclasses.fields(PoolLimits)}
    if not isinstance(data, dict) or not set(data) <= known:
        raise ConfigError(f"limits file {path}: expected an object with fields among {sorted(known)}")
    try:
        return base.replace(**data)
    except (TypeError, InvalidLimits) as exc:
        raise ConfigError(f"limits file {path}: {exc}") from None


def option_table(options: Sequence[Option] = OPTIONS) -> str:
    """The README's configuration table, in Markdown."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for option in options:
        default = option.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else ("" if default is None else default)
        rows.append(f"| `{option.flag}` | `{option.env}` | `{shown}` | {option.help} |")
    return "\n".join(rows)
