"""Where settings come from: every option of ``fetchpool serve`` as a flag and a ``FETCHPOOL_*`` variable.

Every option is declared once in :data:`OPTIONS` (flag, environment variable,
type, default, help); the CLI and the README's configuration table come from it.
A flag beats its environment variable, which beats the embedded default.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fetchpool.config.settings import (
    FetchSettings,
    PoolLimits,
    PoolPolicy,
    RetryPolicy,
    ServerSettings,
    Settings,
    Timeouts,
)
from fetchpool.errors import ConfigError

__all__ = ["BOOLEAN_WORDS", "OPTIONS", "Option", "add_arguments", "option_table", "settings_from_args"]


#: The words a boolean option takes (as systemd and Kubernetes' env conventions do), any case.
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise ValueError(f"not a boolean: {text!r} ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)})")


def _int(text: str) -> int:
    """A whole number; ValueError in the words of ``fetchpool fetch`` (not Python's)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    raise ValueError(f"not a whole number: {text!r}")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(_int(part) for part in _csv(text))


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: where it goes (``section.field``), its flag and variable, and its doc."""

    target: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str
    metavar: str = ""  # the value's placeholder in --help; by default the parser's (_PLACEHOLDERS)

    @property
    def default(self) -> Any:
        section, name = self.target.split(".")
        if section == "settings":
            return getattr(Settings(), name)
        return getattr(getattr(Settings(), section), name)

    @property
    def shown_default(self) -> str:
        """The default as it is written in a flag: ``true``, ``5`` (not 5.0), ``429,503``; "" for none."""
        return _written(self.default)

    @property
    def placeholder(self) -> str:
        return self.metavar or _PLACEHOLDERS.get(self.parse, "VALUE")

    @property
    def help_text(self) -> str:
        """The help of ``fetchpool serve --help``: the meaning, the variable, the default and, for a
        boolean, how to turn it the other way."""
        shown = self.shown_default or "none"
        switch = ""
        if self.parse is _bool:
            switch = "; false turns it off" if self.default else "; the flag alone turns it on"
        return f"{self.help} (env {self.env}; default {shown}{switch})"


def _written(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join(map(_written, value))
    return "" if value is None else str(value)


#: Placeholders of values in --help, by parser (durations are seconds: most floats are).
_PLACEHOLDERS: dict[Callable[[str], Any], str] = {_int: "N", _float: "SECONDS", _bool: "BOOL", _csv: "LIST",
                                                  _ints: "N,..."}
#: How a boolean option is written, for --help and the README.
BOOLEAN_WORDS = (f"a BOOL is {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)} (any case), "
                 "and a boolean flag alone is true")


OPTIONS: tuple[Option, ...] = (
    Option("server.listen", "--listen", "FETCHPOOL_LISTEN", str,
           "gRPC listen address, host:port ([::]:port for IPv6; port 0 picks a free one)", metavar="HOST:PORT"),
    Option("limits.max_connections", "--max-connections", "FETCHPOOL_MAX_CONNECTIONS", _int,
           "open connections per pool at most (over HTTP/2 each carries many requests)"),
    Option("limits.max_requests", "--max-requests", "FETCHPOOL_MAX_REQUESTS", _int,
           "requests in flight per pool at most; 0 = max_connections x 100"),
    Option("limits.max_keepalive_connections", "--max-keepalive-connections",
           "FETCHPOOL_MAX_KEEPALIVE_CONNECTIONS", _int, "idle connections kept per pool at most"),
    Option("limits.keepalive_expiry", "--keepalive-expiry", "FETCHPOOL_KEEPALIVE_EXPIRY", _float,
           "seconds an idle connection is kept"),
    Option("limits.pool_timeout", "--pool-timeout", "FETCHPOOL_POOL_TIMEOUT", _float,
           "seconds a request may wait for a pooled connection (then POOL_TIMEOUT)"),
    Option("limits.max_connections_per_host", "--max-connections-per-host",
           "FETCHPOOL_MAX_CONNECTIONS_PER_HOST", _int, "requests in flight to one origin at most; 0 = no cap"),
    Option("timeouts.connect", "--connect-timeout", "FETCHPOOL_CONNECT_TIMEOUT", _float,
           "seconds to open a connection (TCP, proxy CONNECT, TLS)"),
    Option("timeouts.read", "--read-timeout", "FETCHPOOL_READ_TIMEOUT", _float, "seconds between two reads"),
    Option("timeouts.write", "--write-timeout", "FETCHPOOL_WRITE_TIMEOUT", _float, "seconds between two writes"),
    Option("timeouts.request", "--request-timeout", "FETCHPOOL_REQUEST_TIMEOUT", _float,
           "default total seconds per fetch (a request's own timeout overrides it)"),
    Option("timeouts.max_request", "--max-request-timeout", "FETCHPOOL_MAX_REQUEST_TIMEOUT", _float,
           "largest per-request timeout accepted, seconds"),
    Option("fetch.proxies", "--proxy", "FETCHPOOL_PROXY", _csv,
           "forward proxies, comma-separated (http://user:pass@host:port, socks5://...); empty = direct",
           metavar="URL,..."),
    Option("fetch.proxy_policy", "--proxy-policy", "FETCHPOOL_PROXY_POLICY", str,
           "proxy choice per request: round_robin, least_busy or sticky", metavar="POLICY"),
    Option("fetch.batch_concurrency", "--batch-concurrency", "FETCHPOOL_BATCH_CONCURRENCY", _int,
           "fetches in flight per FetchMany/FetchStream call by default"),
    Option("fetch.max_batch_concurrency", "--max-batch-concurrency", "FETCHPOOL_MAX_BATCH_CONCURRENCY", _int,
           "largest per-call concurrency a caller may ask for"),
    Option("fetch.max_batch_size", "--max-batch-size", "FETCHPOOL_MAX_BATCH_SIZE", _int,
           "requests per FetchMany call at most (more: RESOURCE_EXHAUSTED)"),
    Option("fetch.max_body_bytes", "--max-body-bytes", "FETCHPOOL_MAX_BODY_BYTES", _int,
           "largest response body, bytes (decoded); more gives TOO_LARGE", metavar="BYTES"),
    Option("fetch.follow_redirects", "--follow-redirects", "FETCHPOOL_FOLLOW_REDIRECTS", _bool,
           "follow redirects unless a request says otherwise"),
    Option("fetch.max_redirects", "--max-redirects", "FETCHPOOL_MAX_REDIRECTS", _int, "redirects followed at most"),
    Option("fetch.ca_bundle", "--ca-bundle", "FETCHPOOL_CA_BUNDLE", str,
           "PEM file of CAs to trust instead of certifi's bundle", metavar="FILE"),
    Option("retry.attempts", "--retry-attempts", "FETCHPOOL_RETRY_ATTEMPTS", _int,
           "attempts per fetch at most, the first included (1 = no retries)"),
    Option("retry.statuses", "--retry-statuses", "FETCHPOOL_RETRY_STATUSES", _ints,
           "HTTP statuses retried for idempotent requests, comma-separated", metavar="STATUS,..."),
    Option("retry.backoff_base", "--retry-backoff-base", "FETCHPOOL_RETRY_BACKOFF_BASE", _float,
           "seconds; retry n waits uniform(0, min(max, base * 2**n)) unless Retry-After says"),
    Option("retry.backoff_max", "--retry-backoff-max", "FETCHPOOL_RETRY_BACKOFF_MAX", _float,
           "seconds; the back-off cap"),
    Option("retry.max_retry_after", "--max-retry-after", "FETCHPOOL_MAX_RETRY_AFTER", _float,
           "seconds; a longer Retry-After is not waited for (the response is returned)"),
    Option("retry.budget_ratio", "--retry-budget", "FETCHPOOL_RETRY_BUDGET", _float,
           "retries in progress at most this share of requests in flight, and at least 3 at once (Envoy "
           "retry_budget: budget_percent, min_retry_concurrency)", metavar="RATIO"),
    Option("pool.max_requests_per_connection", "--max-requests-per-connection",
           "FETCHPOOL_MAX_REQUESTS_PER_CONNECTION", _int, "retire a connection after this many requests; 0 = never"),
    Option("pool.max_connection_age", "--max-connection-age", "FETCHPOOL_MAX_CONNECTION_AGE", _float,
           "seconds; retire a connection this old; 0 = never"),
    Option("pool.proxy_eject_failures", "--proxy-eject-failures", "FETCHPOOL_PROXY_EJECT_FAILURES", _int,
           "consecutive proxy failures that eject a proxy for a cool-down; 0 = never"),
    Option("pool.proxy_eject_seconds", "--proxy-eject-seconds", "FETCHPOOL_PROXY_EJECT_SECONDS", _float,
           "seconds a proxy is ejected, times its ejection count (at most 10x)"),
    Option("pool.host_rate", "--host-rate", "FETCHPOOL_HOST_RATE", _float,
           "requests per second per origin at most; 0 = no limit", metavar="PER_SECOND"),
    Option("pool.dynamic", "--dynamic-limits", "FETCHPOOL_DYNAMIC_LIMITS", _bool,
           "let each pool's working limit (requests admitted) follow demand between the floor and max_requests"),
    Option("pool.dynamic_floor", "--dynamic-floor", "FETCHPOOL_DYNAMIC_FLOOR", _int,
           "the lowest working limit in dynamic mode"),
    Option("fetch.ssrf_guard", "--ssrf-guard", "FETCHPOOL_SSRF_GUARD", _bool,
           "refuse targets that resolve to loopback, private, link-local, ... addresses"),
    Option("fetch.allow_targets", "--allow-targets", "FETCHPOOL_ALLOW_TARGETS", _csv,
           "CIDRs and host patterns allowed despite the SSRF guard, comma-separated", metavar="RULE,..."),
    Option("fetch.deny_targets", "--deny-targets", "FETCHPOOL_DENY_TARGETS", _csv,
           "CIDRs and host patterns always refused (e.g. the cluster's service range)", metavar="RULE,..."),
    Option("fetch.max_header_bytes", "--max-header-bytes", "FETCHPOOL_MAX_HEADER_BYTES", _int,
           "largest response header block, bytes; more gives TOO_LARGE", metavar="BYTES"),
    Option("fetch.max_header_count", "--max-header-count", "FETCHPOOL_MAX_HEADER_COUNT", _int,
           "most response header fields; more gives TOO_LARGE"),
    Option("fetch.max_fetches", "--max-fetches", "FETCHPOOL_MAX_FETCHES", _int,
           "fetches in flight or waiting in the whole process at most"),
    Option("fetch.transport", "--transport", "FETCHPOOL_TRANSPORT", str,
           "HTTP engine under every pool: httpcore (httpx's own) or curl (libcurl); see Transports", metavar="ENGINE"),
    Option("server.grace_period", "--grace-period", "FETCHPOOL_GRACE_PERIOD", _float,
           "seconds in-flight calls may run after SIGTERM before they are cancelled"),
    Option("server.max_connection_age", "--grpc-max-connection-age", "FETCHPOOL_GRPC_MAX_CONNECTION_AGE", _float,
           "seconds before a caller's gRPC connection is recycled (so callers re-resolve); 0 = never"),
    Option("server.max_connection_age_grace", "--grpc-max-connection-age-grace",
           "FETCHPOOL_GRPC_MAX_CONNECTION_AGE_GRACE", _float,
           "seconds calls still running on a recycled connection may go on; 0 = until they end"),
    Option("server.keepalive_time", "--grpc-keepalive-time", "FETCHPOOL_GRPC_KEEPALIVE_TIME", _float,
           "seconds without activity before the server pings a caller's connection; 0 = never"),
    Option("server.keepalive_timeout", "--grpc-keepalive-timeout", "FETCHPOOL_GRPC_KEEPALIVE_TIMEOUT", _float,
           "seconds to wait for the answer to that ping before closing the connection"),
    Option("server.min_ping_interval", "--grpc-min-ping-interval", "FETCHPOOL_GRPC_MIN_PING_INTERVAL", _float,
           "seconds: shortest interval between a caller's keepalive pings accepted (more often: GOAWAY)"),
    Option("server.permit_keepalive_without_calls", "--grpc-permit-keepalive-without-calls",
           "FETCHPOOL_GRPC_PERMIT_KEEPALIVE_WITHOUT_CALLS", _bool,
           "accept keepalive pings on caller connections that have no call in flight"),
    Option("server.max_message_bytes", "--max-message-bytes", "FETCHPOOL_MAX_MESSAGE_BYTES", _int,
           "largest gRPC message received, and largest result message sent when a caller asks for more",
           metavar="BYTES"),
    Option("server.log_level", "--log-level", "FETCHPOOL_LOG_LEVEL", str, "DEBUG, INFO, WARNING or ERROR",
           metavar="LEVEL"),
    Option("server.event_loop", "--event-loop", "FETCHPOOL_EVENT_LOOP", str, "uvloop or asyncio", metavar="LOOP"),
    Option("server.tls_cert", "--tls-cert", "FETCHPOOL_TLS_CERT", str, "PEM certificate chain: serve gRPC over TLS",
           metavar="FILE"),
    Option("server.tls_key", "--tls-key", "FETCHPOOL_TLS_KEY", str, "PEM private key of --tls-cert", metavar="FILE"),
    Option("server.tls_client_ca", "--tls-client-ca", "FETCHPOOL_TLS_CLIENT_CA", str,
           "PEM CA bundle: require client certificates it signed (mutual TLS)", metavar="FILE"),
    Option("server.auth_token_file", "--auth-token-file", "FETCHPOOL_AUTH_TOKEN_FILE", str,
           "file holding the bearer token(s) callers must send (health checks excepted); "
           "one per line, re-read when it changes", metavar="FILE"),
    Option("server.auth_token", "--auth-token", "FETCHPOOL_AUTH_TOKEN", str,
           "the bearer token itself (prefer the file: flags show in ps)", metavar="TOKEN"),
    Option("server.admin_token_file", "--admin-token-file", "FETCHPOOL_ADMIN_TOKEN_FILE", str,
           "file holding the bearer token(s) that alone may call PoolAdmin.SetPoolLimits (the operator's); "
           "one per line, re-read when it changes", metavar="FILE"),
    Option("settings.limits_file", "--limits-file", "FETCHPOOL_LIMITS_FILE", str,
           "JSON file of pool limits applied at start-up (written by the operator); ignored if absent", metavar="FILE"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every option of :data:`OPTIONS` to ``parser`` (defaults stay None: resolved later)."""
    for option in OPTIONS:
        switch: dict[str, Any] = {"nargs": "?", "const": "true"} if option.parse is _bool else {}  # `--flag` = true
        parser.add_argument(
            option.flag,
            dest=option.target.replace(".", "__"),
            default=None,
            metavar=option.placeholder,
            help=option.help_text.replace("%", "%%"),
            **switch,
        )


#: How each section of :class:`Settings` is built from its fields' values.
_SECTIONS: dict[str, Callable[..., Any]] = {
    "server": ServerSettings, "limits": PoolLimits().replace, "timeouts": Timeouts, "fetch": FetchSettings,
    "retry": RetryPolicy, "pool": PoolPolicy,
}
_BY_TARGET = {option.target: option for option in OPTIONS}


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from parsed flags, then ``environ``, then defaults.

    Raises :class:`~fetchpool.errors.ConfigError` naming the flag or variable at fault: the one
    the value came from (or the flag, for a default), and only what was given when a given value
    is at fault (``--max-connections -1`` is the problem, not the limits derived from it).
    """
    env = os.environ if environ is None else environ
    values: dict[str, dict[str, Any]] = {section: {} for section in (*_SECTIONS, "settings")}
    given: dict[str, str] = {}  # option target: the flag or variable its value came from
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
        values[section][name] = value
        given[option.target] = source
    built: dict[str, Any] = {}
    faults: list[tuple[str, str]] = []  # (option target, problem)
    messages: list[str] = []  # problems no field is named for
    for section, make in _SECTIONS.items():
        try:
            built[section] = make(**values[section])
        except ConfigError as exc:
            faults += [(f"{section}.{name}", text) for name, text in exc.fields]
            messages += [] if exc.fields else [str(exc)]
        except (TypeError, ValueError) as exc:
            messages.append(str(exc))
    if faults or messages:
        if any(target in given for target, _ in faults):
            faults = [(target, text) for target, text in faults if target in given]
        raise ConfigError("; ".join(messages + [_fault(target, text, given) for target, text in faults]))
    return Settings(**built, **values["settings"])


def _fault(target: str, text: str, given: Mapping[str, str]) -> str:
    """``"SOURCE: text"`` for the problem ``text`` of the option at ``target``, where SOURCE and the
    fields ``text`` names are the flags or variables the values came from (``(default)`` when the
    value was not given)."""
    section = target.split(".")[0]

    def name(target: str) -> str:
        option = _BY_TARGET.get(target)
        return given.get(target) or (option.flag if option else target.split(".")[1])

    fields = sorted((t.split(".")[1] for t in _BY_TARGET if t.startswith(f"{section}.")), key=len, reverse=True)
    if fields:
        text = re.sub(rf"\b({'|'.join(fields)})\b", lambda m: name(f"{section}.{m[1]}"), text)
    return f"{name(target)}{'' if target in given else ' (default)'}: {text}"


def option_table(options: Sequence[Option] = OPTIONS) -> str:
    """The README's configuration table, in Markdown."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for option in options:
        shown = f"`{option.shown_default}`" if option.shown_default else "none"
        value = f"[{option.placeholder}]" if option.parse is _bool else option.placeholder
        rows.append(f"| `{option.flag} {value}` | `{option.env}` | {shown} | {option.help} |")
    return "\n".join(rows)
