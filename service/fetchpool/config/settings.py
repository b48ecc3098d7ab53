"""The settings of ``fetchpool serve``: small frozen objects that check their own values.

Each section (:class:`PoolLimits`, :class:`Timeouts`, ...) raises
:class:`~fetchpool.errors.ConfigError` when built with values it cannot run with; where the
values come from (flags, ``FETCHPOOL_*`` variables) is :mod:`fetchpool.config.options`'s job.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from fetchpool.addresses import split_host_port
from fetchpool.errors import ConfigError, InvalidLimits

__all__ = [
    "MAX_CONNECTIONS_CEILING",
    "TRANSPORTS",
    "FetchSettings",
    "PoolLimits",
    "PoolPolicy",
    "RetryPolicy",
    "ServerSettings",
    "Settings",
    "Timeouts",
    "load_limits_file",
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
#: What a section's check finds: (field name, what is wrong with its value) pairs.
Problems = list[tuple[str, str]]


def _refuse(problems: Problems, label: str = "", error: type[ConfigError] = ConfigError) -> None:
    """Raise ``error`` for ``problems``, if any: its message names each field (after ``label``),
    its ``fields`` keep the pairs apart (for a flag's name in the CLI, a field violation in gRPC)."""
    if problems:
        raise error("; ".join(f"{label}{name} {text}" for name, text in problems), fields=tuple(problems))


def _seconds(section: Any, names: tuple[str, ...], *, zero: bool) -> Problems:
    """The fields of ``names`` that are not a duration in (0, a day], or [0, a day] with ``zero``."""
    problems = []
    for name in names:
        value = getattr(section, name)
        above = value >= 0 if zero else value > 0
        if not (math.isfinite(value) and above and value <= MAX_SECONDS):
            problems.append((name, f"must be in {'[0' if zero else '(0'}, {MAX_SECONDS:.0f}] seconds, got {value}"))
    return problems


def _positive(section: Any, names: tuple[str, ...], least: int = 1) -> Problems:
    return [(name, f"must be at least {least}, got {getattr(section, name)}")
            for name in names if getattr(section, name) < least]


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
        problems: Problems = []
        if not 1 <= self.max_connections <= MAX_CONNECTIONS_CEILING:
            problems.append(("max_connections", f"must be in 1..{MAX_CONNECTIONS_CEILING}, got {self.max_connections}"))
        for name in ("max_keepalive_connections", "max_connections_per_host"):
            if not 0 <= getattr(self, name) <= self.max_connections:
                problems.append((name, f"must be in 0..max_connections ({self.max_connections}), "
                                       f"got {getattr(self, name)}"))
        if not 0 <= self.max_requests <= MAX_REQUESTS_CEILING:
            problems.append(("max_requests", f"must be in 0..{MAX_REQUESTS_CEILING} (0: max_connections x "
                                             f"{REQUESTS_PER_CONNECTION}), got {self.max_requests}"))
        problems += _seconds(self, ("keepalive_expiry", "pool_timeout"), zero=False)
        _refuse(problems, error=InvalidLimits)

    @property
    def requests_cap(self) -> int:
        """Requests in flight through the pool at most: ``max_requests``, or what 0 stands for."""
        return self.max_requests or self.max_connections * REQUESTS_PER_CONNECTION

    def replace(self, **changes: Any) -> PoolLimits:
        """A copy with ``changes`` applied; raises InvalidLimits if the result is invalid.

        When ``max_connections`` shrinks and ``max_keepalive_connections`` /
        ``max_connections_per_host`` are not among ``changes``, they are clamped
        to it; values given explicitly are checked as given. A value clamped to an invalid
        ``max_connections`` is not reported: only what was given is at fault.
        """
        ceiling = changes.get("max_connections", self.max_connections)
        clamped = set()
        for dependent in ("max_keepalive_connections", "max_connections_per_host"):
            if dependent not in changes and isinstance(ceiling, int):
                changes[dependent] = min(getattr(self, dependent), ceiling)
                clamped.add(dependent)
        try:
            return dataclasses.replace(self, **changes)
        except InvalidLimits as exc:
            _refuse([(name, text) for name, text in exc.fields if name not in clamped], error=InvalidLimits)
            raise


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
        problems = _seconds(self, tuple(f.name for f in dataclasses.fields(self)), zero=False)
        if not problems and self.request > self.max_request:
            problems.append(("request", f"must be at most max_request ({self.max_request}), got {self.request}"))
        _refuse(problems, label="timeout ")


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
        problems: Problems = []
        if self.transport not in TRANSPORTS:
            problems.append(("transport", f"must be {' or '.join(TRANSPORTS)}, got {self.transport!r}"))
        if self.proxy_policy not in ("round_robin", "least_busy", "sticky"):
            problems.append(("proxy_policy", f"must be round_robin, least_busy or sticky, got {self.proxy_policy!r}"))
        problems += _positive(self, ("max_body_bytes", "max_batch_concurrency", "max_batch_size", "max_header_bytes",
                                     "max_header_count", "max_fetches"))
        problems += _positive(self, ("max_redirects",), least=0)
        if self.max_batch_concurrency >= 1 and not 1 <= self.batch_concurrency <= self.max_batch_concurrency:
            problems.append(("batch_concurrency", f"must be in 1..max_batch_concurrency "
                                                  f"({self.max_batch_concurrency}), got {self.batch_concurrency}"))
        if self.ca_bundle and not os.path.isfile(self.ca_bundle):
            problems.append(("ca_bundle", f"{self.ca_bundle!r} is not a file"))
        _refuse(problems)


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
        problems: Problems = []
        if not 1 <= self.attempts <= 20:
            problems.append(("attempts", f"must be in 1..20, got {self.attempts}"))
        if bad := [s for s in self.statuses if not 100 <= s <= 599]:
            problems.append(("statuses", f"must be HTTP status codes (100..599), got {', '.join(map(str, bad))}"))
        problems += _seconds(self, ("backoff_max", "max_retry_after"), zero=True)
        if not 0 <= self.backoff_base <= self.backoff_max:
            problems.append(("backoff_base", f"must be in 0..backoff_max ({self.backoff_max}) seconds, "
                                             f"got {self.backoff_base}"))
        if not 0 <= self.budget_ratio <= 1:
            problems.append(("budget_ratio", f"must be in 0..1, got {self.budget_ratio}"))
        problems += _positive(self, ("budget_min",), least=0)
        _refuse(problems, label="retry ")


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
        problems = _positive(self, ("max_requests_per_connection", "proxy_eject_failures"), least=0)
        problems += _seconds(self, ("max_connection_age",), zero=True)
        problems += _seconds(self, ("proxy_eject_seconds",), zero=False)
        if not 0 <= self.host_rate <= 1e6:
            problems.append(("host_rate", f"must be in 0..1e6 requests per second, got {self.host_rate}"))
        problems += _positive(self, ("dynamic_floor",))
        _refuse(problems)


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
        problems: Problems = []
        if self.event_loop not in ("uvloop", "asyncio"):
            problems.append(("event_loop", f"must be uvloop or asyncio, got {self.event_loop!r}"))
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            problems.append(("log_level", f"must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}"))
        problems += _seconds(self, ("grace_period", "max_connection_age", "max_connection_age_grace",
                                    "keepalive_time", "min_ping_interval"), zero=True)
        problems += _seconds(self, ("keepalive_timeout",), zero=False)
        problems += _positive(self, ("max_message_bytes",), least=1024)
        _refuse(problems)


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
