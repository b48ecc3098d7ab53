"""The engine: one shared ``httpx.AsyncClient`` over one pool per proxy, and the fetch of one URL."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import ssl
import time
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.lowlevel
import certifi
import httpx

from fetchpool.config import PoolLimits, Settings
from fetchpool.engine._client import PoolClient
from fetchpool.engine._httpcore import OpenFailed
from fetchpool.engine.body import ACCEPT_ENCODING, read_body
from fetchpool.engine.guard import TargetGuard
from fetchpool.engine.hooks import FetchObserver
from fetchpool.engine.model import FetchSpec, Headers, Outcome
from fetchpool.engine.phases import PhaseRecorder
from fetchpool.engine.politeness import HostRate
from fetchpool.engine.pool import EWMA_WEIGHT, Pool, PoolSnapshot
from fetchpool.engine.proxies import DIRECT, Selector, parse_proxy
from fetchpool.engine.responses import check_headers, describe_peer, describe_response
from fetchpool.engine.retries import IDEMPOTENT, NOT_SENT, RetryBudget, backoff, parse_retry_after, retryable
from fetchpool.engine.routing import INSECURE_EXTENSION, POOL_EXTENSION, Router
from fetchpool.engine.sessions import SessionCookies
from fetchpool.engine.transports import RECORDER_EXTENSION, TransportConfig, make_transport
from fetchpool.engine.validate import check, location_problem, url_problem
from fetchpool.errors import ConfigError, ErrorKind, FetchFailed, InvalidLimits, classify, proxy_status
from fetchpool.redact import redact_url

logger = logging.getLogger(__name__)

#: Seconds between two passes of the pools' upkeep (idle connections, dynamic limits, stats).
TEND_INTERVAL = 1.0
#: Statuses a proxy gives to CONNECT that count as the proxy's failure (gateway errors, 407).
PROXY_FAULTS = frozenset({401, 407, 502, 503, 504})
#: Sends of one attempt repeated at most when a reused connection went away before any response.
RESENDS = 3


def _reason(kind: ErrorKind, message: str) -> str:
    """A failure as ``Outcome.retry_reasons`` gives it: "NETWORK: connection failed: ..."."""
    return f"{kind.name}: {message}"


def _origin(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"


def _trusting(ca_bundle: str) -> ssl.SSLContext:
    """The TLS context of every pool: verifies targets against the CAs of ``ca_bundle`` (a PEM file).

    Raises ConfigError when the file cannot be read or holds no certificate (ssl would raise SSLError).
    """
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (ssl.SSLError, OSError) as exc:
        detail = re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc.strerror or exc))
        raise ConfigError(f"CA bundle {ca_bundle!r} is not a PEM file of CA certificates: {detail}") from None


def _header(headers: Headers, name: str) -> str | None:
    return next((value for key, value in headers if key.lower() == name), None)


class Engine:
    """Fetches URLs through one pooled HTTP/2 ``httpx.AsyncClient``.

    Use as ``async with Engine(settings) as engine: outcome = await engine.fetch(spec)``.
    Raises :class:`~fetchpool.errors.ConfigError` at construction for bad proxies, target rules or
    CA bundle.
    """

    def __init__(self, settings: Settings, observer: FetchObserver | None = None) -> None:
        self.settings = settings
        self.observer = observer
        self.draining = False
        self.aborting = False
        self._drain_started = asyncio.Event()
        self._in_flight: set[asyncio.Task[Any]] = set()
        fetch = settings.fetch
        ca_bundle = fetch.ca_bundle or certifi.where()
        self.guard = TargetGuard(fetch.ssrf_guard, fetch.allow_targets, fetch.deny_targets)
        proxies = [parse_proxy(url) for url in fetch.proxies]
        # Proxies are the operator's choice (often private addresses): only direct pools
        # connect through the guard; proxied targets are checked before each request.
        config = TransportConfig(limits=settings.limits, policy=settings.pool, ca_bundle=ca_bundle,
                                 ssl_context=_trusting(ca_bundle), max_header_bytes=fetch.max_header_bytes)
        pools = [Pool(p.key, settings.limits, settings.pool, make_transport(
            fetch.transport, dataclasses.replace(config, proxy_url=p.url)), proxy=True) for p in proxies] or [
            Pool(DIRECT, settings.limits, settings.pool, make_transport(
                fetch.transport, dataclasses.replace(config, guard=self.guard)))
        ]
        self._pools = {pool.name: pool for pool in pools}
        self._selector = Selector(settings.fetch.proxy_policy, pools)
        self._budget = RetryBudget(settings.retry.budget_ratio, settings.retry.budget_min)
        self._host_rate = HostRate(settings.pool.host_rate) if settings.pool.host_rate else None
        self._cookies = SessionCookies()
        t = settings.timeouts
        self.client = PoolClient(
            transport=Router(self._pools),
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=settings.limits.pool_timeout),
            follow_redirects=False,
            trust_env=False,
            headers={"Accept-Encoding": ACCEPT_ENCODING},
        )
        self._fetch_slots = asyncio.Semaphore(fetch.max_fetches)
        self.processing_mean = 0.0
        self._cpu_mark = (time.process_time(), 0)
        self._tender: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Engine:
        # httpcore's locks import anyio's asyncio backend on first use (~0.1 s, more on a busy
        # machine); do it now rather than inside the first fetch's pool wait.
        await anyio.lowlevel.checkpoint()
        self._tender = asyncio.create_task(self._tend(), name="fetchpool-tend")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the upkeep task and close the client (every pool's connections)."""
        if self._tender is not None:
            self._tender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tender
            self._tender = None
        await self.client.aclose()
        if self.observer is not None:
            self.observer.flush()

    async def _tend(self) -> None:
        while True:
            await asyncio.sleep(TEND_INTERVAL)
            self._measure_processing()
            now = time.monotonic()
            for pool in self._pools.values():
                try:
                    closed = await pool.tend(now)
                except Exception:
                    logger.exception("upkeep of pool %s failed", pool.name)
                    continue
                if self.observer is not None:
                    for lifetime, version in closed:
                        self.observer.connection_closed(pool.name, lifetime, version)
            if self.observer is not None:
                self.observer.flush()
            if self._host_rate is not None:
                self._host_rate.prune()
            self._cookies.prune()

    def _measure_processing(self) -> None:
        # Process CPU seconds per response served: the "processing time" of the sizing formula.
        cpu, served = time.process_time(), sum(p.requests_total for p in self._pools.values())
        spent, count = cpu - self._cpu_mark[0], served - self._cpu_mark[1]
        if count > 0:
            sample = spent / count
            self.processing_mean += EWMA_WEIGHT * (sample - self.processing_mean) if self.processing_mean else sample
        self._cpu_mark = (cpu, served)

    def begin_drain(self) -> None:
        """Start no new fetch from a batch (they yield UNAVAILABLE); fetches in flight go on."""
        self.draining = True
        self._drain_started.set()

    async def drained(self) -> None:
        """Return once :meth:`begin_drain` was called."""
        await self._drain_started.wait()

    def abort_in_flight(self) -> None:
        """End every fetch in flight now: each returns an UNAVAILABLE outcome (resubmit it),
        so a shutdown that outlives its grace period still answers every item."""
        self.aborting = True
        for task in list(self._in_flight):
            task.cancel()

    @property
    def pools(self) -> list[Pool]:
        """The pools, direct or one per proxy."""
        return list(self._pools.values())

    @property
    def demand(self) -> int:
        """Requests in flight plus waiting, over every pool (the per-pod HPA signal)."""
        return sum(pool.load for pool in self._pools.values())

    def snapshots(self) -> list[PoolSnapshot]:
        """Stats of every pool now."""
        return [pool.snapshot(self.processing_mean) for pool in self._pools.values()]

    def set_limits(self, changes: Mapping[str, Any], pool: str = "") -> dict[str, PoolLimits]:
        """Change limits live, for pool ``pool`` or for all when empty.

        ``changes`` holds :class:`PoolLimits` field values. All-or-nothing: raises
        :class:`~fetchpool.errors.InvalidLimits` (nothing changed) for bad values, and
        KeyError for an unknown pool. Returns the limits in force per pool.
        """
        targets = [self._pools[pool]] if pool else list(self._pools.values())
        try:
            planned = [(p, p.limits.replace(**changes)) for p in targets]
        except TypeError as exc:
            raise InvalidLimits(str(exc)) from None
        for target, limits in planned:
            target.set_limits(limits)
        if planned:
            logger.info("pool limits now %s", {p.name: limits for p, limits in planned})
        return {name: p.limits for name, p in self._pools.items()}

    async def fetch(self, spec: FetchSpec) -> Outcome:
        """Fetch one URL; never raises for a fetch failure (see ``Outcome.error_kind``).

        Raises only ``asyncio.CancelledError`` when the caller cancels (connections
        are released first).
        """
        outcome = Outcome(url=spec.url)
        started = time.monotonic()
        token = self.observer.fetch_started(spec) if self.observer is not None else None
        recorder: PhaseRecorder | None = None
        self._budget.requests += 1
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            method, url, timeout = check(spec, self.settings.timeouts)
            recorder = PhaseRecorder()
            try:
                async with asyncio.timeout(timeout), self._fetch_slots:
                    await self._attempts(spec, method, url, recorder, outcome)
            except TimeoutError:
                raise FetchFailed(ErrorKind.TIMEOUT, f"fetch exceeded its total timeout of {timeout:.3g} s") from None
        except asyncio.CancelledError:
            if not self.aborting:
                outcome.error_kind, outcome.error_message = ErrorKind.CANCELLED, "cancelled by the caller"
                raise
            outcome.error_kind = ErrorKind.UNAVAILABLE
            outcome.error_message = "stopped by the server's shutdown before it finished; resubmit this item"
        except Exception as exc:
            outcome.error_kind, outcome.error_message = classify(exc)
            if outcome.error_kind is ErrorKind.INTERNAL:
                logger.exception("fetch of %s failed unexpectedly", redact_url(spec.url))
        finally:
            self._in_flight.discard(task)  # type: ignore[arg-type]
            self._budget.requests -= 1
            if recorder is not None:
                outcome.timings = recorder.timings(0.0)
            outcome.timings.total = time.monotonic() - started
            if self.observer is not None:
                self.observer.fetch_finished(token, outcome, recorder)
        return outcome

    def _failure(self, exc: Exception, pool: Pool, recorder: PhaseRecorder) -> FetchFailed:
        """Classify an attempt's exception once, and count it against the proxy when it is the proxy's."""
        step = recorder.failed_step
        if isinstance(exc.__cause__, OpenFailed):  # it waited for a connection that failed to open
            step, exc = exc.__cause__.step, exc.__cause__.cause  # type: ignore[assignment]
        to_proxy = pool.proxy and step in ("connect", "proxy.connect")
        kind, message = classify(exc, via_proxy=pool.proxy, connecting_to_proxy=to_proxy)
        # Like Envoy's consecutive local-origin failures: besides a refused or failed
        # tunnel, a connection through the proxy that breaks before any response counts.
        proxy_fault = kind in (ErrorKind.PROXY, ErrorKind.PROXY_AUTH) and proxy_status(exc) in (None, *PROXY_FAULTS)
        proxy_fault |= kind in (ErrorKind.NETWORK, ErrorKind.PROTOCOL) and not recorder.responded
        if pool.proxy and proxy_fault and pool.health.failure(time.monotonic()):
            logger.warning("proxy %s ejected for %.0f s after %d consecutive failures", pool.name,
                           pool.health.ejected_until - time.monotonic(), pool.health.failures)
        return FetchFailed(kind, message)

    async def _attempts(
        self, spec: FetchSpec, method: str, url: httpx.URL, recorder: PhaseRecorder, outcome: Outcome
    ) -> None:
        """Attempts until one succeeds, the policy or the budget says stop, or the deadline passes.

        A proxy failure, or a proxy ejected meanwhile, moves the next attempt to another
        proxy; a 407 is never retried on the same proxy. Raises FetchFailed with the
        last attempt's failure.
        """
        policy = self.settings.retry
        pool: Pool = self._selector.pick(spec.session_key)  # type: ignore[assignment]
        holding = False  # a retry-budget slot, held over the back-off and the retry
        try:
            for attempt in range(1, policy.attempts + 1):
                outcome.pool = pool.name
                outcome.attempts += 1
                failure: FetchFailed | None = None
                try:
                    await self._exchange(spec, method, url, pool, recorder, outcome)
                except FetchFailed as exc:
                    failure = exc  # ours (TOO_LARGE, POOL_TIMEOUT, ...): never retried
                    break
                except Exception as exc:
                    failure = self._failure(exc, pool, recorder)
                    logger.debug("attempt %d of %s via %s: %s: %s", attempt, redact_url(str(url)), pool.name,
                                 failure.kind.name, failure)
                    if failure.kind is ErrorKind.PROXY_AUTH:
                        if self._selector.pick(spec.session_key, avoid=pool) is pool:
                            break  # no other proxy to try the request on
                    elif not retryable(failure.kind, method):
                        break
                    delay = backoff(attempt, policy)
                else:
                    if pool.proxy:
                        pool.health.success()
                    if outcome.status_code not in policy.statuses or method not in IDEMPOTENT:
                        return
                    after = parse_retry_after(_header(outcome.headers, "retry-after"))
                    if after is not None and after > policy.max_retry_after:
                        return
                    delay = after if after is not None else backoff(attempt, policy)
                if attempt == policy.attempts:
                    break
                if holding:
                    self._budget.release()
                    holding = False
                # The budget protects targets from retry storms: a request that never left
                # (a refused connect, a failed tunnel) or that an ejected proxy failed is exempt.
                proxy_blamed = failure is not None and (failure.kind in NOT_SENT or failure.kind is ErrorKind.PROXY_AUTH
                                                        or not pool.available)
                if not proxy_blamed:
                    holding = self._budget.try_acquire()
                    if not holding:
                        if failure is not None:  # say why this one got fewer attempts than others
                            failure = FetchFailed(failure.kind, f"{failure} (not retried: the retry budget is spent)")
                        break
                pool.retries_total += 1
                outcome.retry_reasons.append(_reason(failure.kind, str(failure)) if failure is not None
                                             else f"status {outcome.status_code}")
                start = time.monotonic()
                await asyncio.sleep(delay)
                recorder.add("retry.backoff", start, time.monotonic(), attempt=attempt + 1)
                if failure is not None and (failure.kind in (ErrorKind.PROXY, ErrorKind.PROXY_AUTH)
                                            or not pool.available):
                    pool = self._selector.pick(spec.session_key, avoid=pool)  # type: ignore[assignment]
            if failure is not None:
                raise failure
        finally:
            if holding:
                self._budget.release()

    async def _exchange(
        self, spec: FetchSpec, method: str, url: httpx.URL, pool: Pool, recorder: PhaseRecorder, outcome: Outcome
    ) -> None:
        """One attempt: send, follow redirects, read the body; fills ``outcome``; raises on failure.

        A request whose reused connection went away before any response (a keep-alive
        connection the server closed meanwhile, an HTTP/2 connection that died) got no answer,
        so an idempotent one is sent again at once, outside the retry policy, as Go's net/http
        does. Requests an HTTP/2 server's GOAWAY says it never processed are moved to another
        connection by the pool itself (``engine/_httpcore/h2.py``).
        """
        fetch = self.settings.fetch
        follow = fetch.follow_redirects if spec.follow_redirects is None else spec.follow_redirects
        cap = min(spec.max_body_bytes or fetch.max_body_bytes, fetch.max_body_bytes)
        outcome.status_code, outcome.headers, outcome.body, outcome.http_version = 0, [], b"", ""
        outcome.redirects = []
        request = self.client.new_request(
            method, url, spec.headers, spec.body or None,
            {POOL_EXTENSION: pool.name, INSECURE_EXTENSION: spec.tls_insecure_skip_verify, "trace": recorder.trace,
             RECORDER_EXTENSION: recorder},
        )
        seen: set[str] = set()  # the URLs of this attempt's hops, once it is redirected
        resends_left = RESENDS if method in IDEMPOTENT else 0
        while True:
            try:
                response = await self._hop(spec, request, pool, recorder, outcome, cap)
            except (httpx.ProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if resends_left and not recorder.responded and not recorder.connected:
                    resends_left -= 1
                    outcome.attempts += 1
                    outcome.retry_reasons.append(_reason(*classify(exc, via_proxy=pool.proxy)))
                    pool.retries_total += 1
                    continue
                raise
            next_request = response.next_request
            if not (follow and response.has_redirect_location):
                return
            if next_request is None:  # PoolClient found its Location no URL, or one without a host
                location = response.headers["location"]
                raise FetchFailed(ErrorKind.INVALID_URL, f"redirect to {redact_url(location)!r}: "
                                  f"{location_problem(location)}")
            seen.add(outcome.final_url)  # the URL of the hop just made (str(url) on the first)
            if len(seen) > fetch.max_redirects:
                raise FetchFailed(ErrorKind.TOO_MANY_REDIRECTS, f"more than {fetch.max_redirects} redirects")
            target = str(next_request.url)
            if problem := url_problem(next_request.url):
                raise FetchFailed(ErrorKind.INVALID_URL, f"redirect to {redact_url(target)}: {problem}")
            if target in seen:
                raise FetchFailed(ErrorKind.TOO_MANY_REDIRECTS, f"redirect loop back to {redact_url(target)}")
            seen.add(target)
            outcome.redirects.append((outcome.final_url, response.status_code))
            request = next_request

    async def _hop(self, spec: FetchSpec, request: httpx.Request, pool: Pool, recorder: PhaseRecorder,
                   outcome: Outcome, cap: int) -> httpx.Response:
        """One request and its whole response, in a lease of ``pool``; fills ``outcome``."""
        target = request.url
        if pool.proxy:
            await self.guard.check(target.host, target.port or (443 if target.scheme == "https" else 80))
        host = _origin(target)
        if self._host_rate is not None:
            await self._host_rate.wait(host)
        session = spec.session_key if spec.keep_cookies else ""
        if session:
            self._cookies.add_header(session, request)
        async with pool.lease(host, recorder) as lease:
            try:
                response = await lease.send(self.client, request)
            finally:
                # Sent again inside the transport (a GOAWAY refused it; with curl, a connection
                # that died unanswered too).
                outcome.attempts += len(recorder.resent)
                outcome.retry_reasons += recorder.resent
                if recorder.sends:  # on a connection, answered or not (a timeout on a reused one too)
                    outcome.connection_reused = lease.reused
            check_headers(response, self.settings.fetch)
            if session:
                self._cookies.keep(session, response)
            describe_peer(response, outcome)
            # The status and headers before the body: a body that fails (TOO_LARGE, a cut
            # connection) leaves a result that still says what the target answered.
            describe_response(response, outcome)
            outcome.body = await read_body(response, cap, recorder)
            lease.served()
        return response
