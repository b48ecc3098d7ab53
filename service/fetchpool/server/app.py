"""Start-up and drain of the gRPC server: servicers, health, reflection, signals."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fetchpool.addresses import split_host_port
from fetchpool.config import PoolLimits, Settings, load_limits_file
from fetchpool.engine import Engine, FetchObserver
from fetchpool.errors import ConfigError
from fetchpool.server.reflection import enable_reflection
from fetchpool.server.security import AuthInterceptor, CallerAuth, server_credentials
from fetchpool.server.servicer import FetchServicer, PoolAdminServicer
from fetchpool.v1 import fetch_pb2 as pb
from fetchpool.v1 import fetch_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

FETCH_SERVICE = pb.DESCRIPTOR.services_by_name["FetchService"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["PoolAdmin"].full_name
#: Listen hosts that only this machine reaches (no admin-token warning for them).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
#: Seconds between two checks of the limits file for changes.
LIMITS_FILE_POLL = 5.0
#: gRPC core's "never" for durations in milliseconds.
INT_MAX = 2**31 - 1


def _ms(seconds: float) -> int:
    """Milliseconds for a channel argument; 0 seconds means never (gRPC core's INT_MAX)."""
    return min(round(seconds * 1000), INT_MAX) if seconds > 0 else INT_MAX


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC channel arguments of the server (see ``ServerSettings`` for the keepalive policy)."""
    server = settings.server
    options = [
        ("grpc.max_receive_message_length", server.max_message_bytes),
        # Never share a port silently with another process.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", _ms(server.keepalive_time)),
        ("grpc.keepalive_timeout_ms", _ms(server.keepalive_timeout)),
        ("grpc.http2.min_ping_interval_without_data_ms", round(server.min_ping_interval * 1000)),
        ("grpc.keepalive_permit_without_calls", int(server.permit_keepalive_without_calls)),
        # The server's own pings must go on over a connection whose calls only wait (an idle
        # FetchStream); gRPC core stops them after 2 pings without data otherwise.
        ("grpc.http2.max_pings_without_data", 0),
        # What actually closes a connection whose peer stopped answering pings: with only
        # keepalive_timeout_ms, a frozen caller's call outlived 15 s of unanswered 1 s pings here
        # (tests/integration/test_keepalive.py, ..._find_a_dead_caller...).
        ("grpc.http2.ping_timeout_ms", _ms(server.keepalive_timeout)),
    ]
    if server.max_connection_age > 0:
        # Callers reconnect, and so re-resolve a headless Service, after this long (GOAWAY: no new
        # call on the old connection); calls still running there go on until they end, or for the
        # grace when one is set.
        options += [
            ("grpc.max_connection_age_ms", _ms(server.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(server.max_connection_age_grace)),
        ]
    return options


def _apply_limits_file(engine: Engine, path: str) -> PoolLimits:
    """Apply the limits file (if present) to every pool; returns what it gave them. Raises ConfigError."""
    limits = load_limits_file(path, engine.pools[0].limits)
    engine.set_limits(dataclasses.asdict(limits))
    return limits


def _lower_from_limits_file(engine: Engine, path: str, given: PoolLimits) -> PoolLimits:
    """Apply a changed limits file to the pools still holding what the file ``given`` them, lowering only.

    The file holds a pod's start limits (the operator's ConfigMap, see fetchpool.operator.budget): a
    pool set since by ``SetPoolLimits`` belongs to the operator and is left alone, and the file never
    raises a pool (a kubelet may project an older version of it after a newer one). Returns the
    file's new limits. Raises ConfigError.
    """
    new = load_limits_file(path, given)
    for pool in engine.pools:
        if pool.limits != given:
            continue
        lowered = new.replace(
            max_connections=min(new.max_connections, pool.limits.max_connections),
            max_keepalive_connections=min(new.max_keepalive_connections, pool.limits.max_keepalive_connections),
        )
        if lowered != pool.limits:
            engine.set_limits(dataclasses.asdict(lowered), pool.name)
    return new


async def _watch_limits_file(engine: Engine, path: str, given: PoolLimits) -> None:
    """Follow changes of the limits file (a mounted ConfigMap is updated in place), lowering only."""
    seen = None
    while True:
        await asyncio.sleep(LIMITS_FILE_POLL)
        with contextlib.suppress(OSError):
            stamp = os.stat(path).st_mtime_ns
            if seen is not None and stamp != seen:
                try:
                    given = _lower_from_limits_file(engine, path, given)
                except ConfigError as exc:
                    logger.error("%s; keeping the limits in force", exc)
            seen = stamp


def _check_port_free(listen: str) -> None:
    """Raise ConfigError when the port of ``listen`` is taken on one of its addresses, before gRPC
    tries it: gRPC core would log an ``add_port.cc`` error and a bare "Failed to bind" instead.
    Bound the way gRPC binds (SO_REUSEADDR, IPv6 sockets dual-stack), so what passes here binds."""
    host, port = split_host_port(listen, ephemeral=True)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {listen}: {host} does not resolve ({exc.strerror})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(f"{listen} is in use (another fetchpool?); set FETCHPOOL_LISTEN or --listen "
                                      "to another address") from None
                raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from None


async def serve(
    settings: Settings,
    *,
    observer: FetchObserver | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    on_started: Callable[[int], None] | None = None,
    on_engine: Callable[[Engine], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the service until SIGTERM/SIGINT (or ``stop`` is set), then drain.

    Drain: health turns NOT_SERVING, new calls get UNAVAILABLE, batch items not
    yet started return UNAVAILABLE results, in-flight calls get
    ``settings.server.grace_period`` seconds, then the HTTP client is closed. A second signal
    ends the grace period at once: fetches still in flight stop, and their calls answer them
    UNAVAILABLE.
    ``on_started`` receives the bound port; ``on_engine`` the engine, before serving starts
    (telemetry reads its pools). Raises ConfigError for bad settings or a listen address in use,
    and RuntimeError when gRPC cannot bind it otherwise.
    """
    _check_port_free(settings.server.listen)
    engine = Engine(settings, observer=observer)
    if on_engine is not None:
        on_engine(engine)
    from_file = _apply_limits_file(engine, settings.limits_file) if settings.limits_file else None
    credentials = server_credentials(settings.server)
    auth = CallerAuth.from_settings(settings.server)
    if not settings.fetch.ssrf_guard:
        logger.warning("SSRF guard off (--ssrf-guard false): fetches may reach loopback, private and link-local "
                       "addresses, the cloud metadata service (169.254.169.254) included; only --deny-targets "
                       "are refused%s", f" ({', '.join(settings.fetch.deny_targets)})"
                       if settings.fetch.deny_targets else ", and there are none")
    if auth.admin is None and settings.server.listen.rsplit(":", 1)[0] not in LOOPBACK_HOSTS:
        logger.warning("no --admin-token-file: PoolAdmin.SetPoolLimits is open to every caller%s",
                       " holding the fetch token" if auth.fetch is not None else "")
    # The token check runs first, so a refused call never reaches telemetry or the engine.
    checks = [AuthInterceptor(auth)] if auth.enabled else []
    server = grpc.aio.server(options=server_options(settings), interceptors=[*checks, *interceptors])
    fetch_servicer = FetchServicer(engine)
    pb_grpc.add_FetchServiceServicer_to_server(fetch_servicer, server)
    pb_grpc.add_PoolAdminServicer_to_server(PoolAdminServicer(engine), server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # public, untyped
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((FETCH_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME), server)
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.server.listen)
        else:
            port = server.add_secure_port(settings.server.listen, credentials)
    except RuntimeError as exc:
        _check_port_free(settings.server.listen)  # taken since the first check: say so
        raise RuntimeError(f"cannot listen on {settings.server.listen}: {exc}") from None
    stop = stop or asyncio.Event()
    hurry = asyncio.Event()  # a signal once draining: in-flight calls get no more time
    loop = asyncio.get_running_loop()
    # One handler for the service's whole life: any signal after the first hurries the drain,
    # also one that arrives before the drain's clean-up has begun.
    _on_signals(loop, lambda: (hurry if stop.is_set() else stop).set())
    async with engine:
        await server.start()
        for service in ("", FETCH_SERVICE, ADMIN_SERVICE):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        host = settings.server.listen.rsplit(":", 1)[0]
        logger.info("fetchpool serving on %s:%d (pools: %s)", host, port, ", ".join(p.name for p in engine.pools))
        if on_started is not None:
            on_started(port)
        watcher = asyncio.create_task(_watch_limits_file(engine, settings.limits_file, from_file)) \
            if settings.limits_file and from_file is not None else None
        try:
            await stop.wait()
        finally:
            logger.info("draining: up to %.3g s for in-flight calls (a second SIGINT or SIGTERM stops them now)",
                        settings.server.grace_period)
            grace = settings.server.grace_period
            drained_by = loop.time() + grace
            await health_servicer.enter_graceful_shutdown()
            engine.begin_drain()
            # Keep serving while in-flight calls finish: health answers NOT_SERVING, new
            # fetch calls get UNAVAILABLE. Near the end of the grace period, fetches still
            # running are stopped so that their calls can still answer them (UNAVAILABLE).
            margin = min(2.0, grace / 5)
            if not await _idle_unless(fetch_servicer.wait_idle(grace - margin), hurry):
                logger.warning("%s: stopping the fetches still in flight",
                               "second signal" if hurry.is_set() else "grace period ending")
                engine.abort_in_flight()
                await fetch_servicer.wait_idle(margin)  # their calls answer them (UNAVAILABLE)
            if watcher is not None:
                watcher.cancel()
            # A call whose handler ended may not have sent its status yet: stop(0) would cancel it
            # (the caller sees UNAVAILABLE "Cancelling all calls" after its results). stop() returns
            # as soon as every call ended, so a hurried drain waits at most the margin for that.
            await server.stop(margin if hurry.is_set() else max(0.0, drained_by - loop.time()))
            _on_signals(loop, None)
    logger.info("stopped")


def _on_signals(loop: asyncio.AbstractEventLoop, handler: Callable[[], None] | None) -> None:
    """Call ``handler`` on SIGTERM and SIGINT (None: the default action again), where the loop can."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            if handler is None:
                loop.remove_signal_handler(signum)
            else:
                loop.add_signal_handler(signum, handler)


async def _idle_unless(idle: Awaitable[bool], hurry: asyncio.Event) -> bool:
    """What ``idle`` answers, or False as soon as ``hurry`` is set."""
    waiting, hurried = asyncio.ensure_future(idle), asyncio.ensure_future(hurry.wait())
    try:
        done, _ = await asyncio.wait({waiting, hurried}, return_when=asyncio.FIRST_COMPLETED)
        return waiting in done and waiting.result()
    finally:
        waiting.cancel()
        hurried.cancel()
