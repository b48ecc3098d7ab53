"""The engine: one shared ``httpx.AsyncClient`` over one pool per proxy, and the fetch of one URL."""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import logging
import re
import ssl
import time
from collections.abc import Mapping
from typing import Any

import certifi
import httpx

from fetchpool.config import PoolLimits, Settings
from fetchpool.engine.admission import AdmissionTimeout
from fetchpool.engine.hooks import FetchObserver
from fetchpool.engine.model import FetchSpec, Outcome
from fetchpool.engine.phases import PhaseRecorder
from fetchpool.engine.pool import Pool, PoolSnapshot
from fetchpool.engine.proxies import DIRECT, Selector, parse_proxy, redact_url
from fetchpool.errors import ErrorKind, FetchFailed, InvalidLimits, classify

logger = logging.getLogger(__name__)

#: Request extension naming the pool a request goes to (read by :class:`Router`).
POOL_EXTENSION = "fetchpool.pool"
#: Seconds between two passes of the idle-connection reaper.
REAP_INTERVAL = 1.0
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
# httpx gives the host IDNA-encoded; what remains is a DNS name or an IP literal.
_HOST = re.compile(rb"^(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|[0-9A-Fa-f:.]+(?:%[A-Za-z0-9]+)?)$")


class _NoCookies(http.cookiejar.CookieJar):
    """The client is shared by every caller: never keep one caller's cookies for another."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None


class Router(httpx.AsyncBaseTransport):
    """Sends each request to the transport of the pool named in its extensions.

    This is how one ``AsyncClient`` keeps one pool per proxy: httpx picks
    proxies by URL pattern only, not per request.
    """

    def __init__(self, pools: Mapping[str, Pool]) -> None:
        self._pools = pools

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pool = self._pools[request.extensions[POOL_EXTENSION]]
        return await pool.transport.handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()


def _origin(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"


class Engine:
    """Fetches URLs through one pooled HTTP/2 ``httpx.AsyncClient``.

    Use as ``async with Engine(settings) as engine: outcome = await engine.fetch(spec)``.
    Raises :class:`~fetchpool.errors.ConfigError` at construction for bad proxies.
    """

    def __init__(self, settings: Settings, observer: FetchObserver | None = None) -> None:
        self.settings = settings
        self.observer = observer
        self.draining = False
        ssl_context = ssl.create_default_context(cafile=settings.fetch.ca_bundle or certifi.where())
        proxies = [parse_proxy(url) for url in settings.fetch.proxies]
        pools = [Pool(p.key, settings.limits, ssl_context, proxy_url=p.url) for p in proxies] or [
            Pool(DIRECT, settings.limits, ssl_context)
        ]
        self._pools = {pool.name: pool for pool in pools}
        self._selector = Selector(settings.fetch.proxy_policy, pools)
        t = settings.timeouts
        self.client = httpx.AsyncClient(
            transport=Router(self._pools),
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=settings.limits.pool_timeout),
            follow_redirects=False,
            trust_env=False,
            cookies=_NoCookies(),
        )
        self._reaper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Engine:
        self._reaper = asyncio.create_task(self._reap(), name="fetchpool-reaper")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the reaper and close the client (every pool's connections)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await self.client.aclose()

    async def _reap(self) -> None:
        # httpcore closes expired or surplus idle connections only when a request
        # arrives; an idle pool would keep them (and a shrunk limit) forever.
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            for pool in self._pools.values():
                try:
                    await pool.close_surplus_idle()
                except Exception:
                    logger.exception("closing idle connections of pool %s failed", pool.name)

    @property
    def pools(self) -> list[Pool]:
        """The pools, direct or one per proxy."""
        return list(self._pools.values())

    def snapshots(self) -> list[PoolSnapshot]:
        """Stats of every pool now."""
        return [pool.snapshot() for pool in self._pools.values()]

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
        try:
            method, url, timeout = self._check(spec)
            pool = self._selector.pick(spec.session_key)  # type: ignore[assignment]
            assert isinstance(pool, Pool)
            outcome.pool = pool.name
            recorder = PhaseRecorder(pool.counters)
            try:
                async with asyncio.timeout(timeout):
                    await self._exchange(spec, method, url, pool, recorder, outcome)
            except TimeoutError:
                raise FetchFailed(ErrorKind.TIMEOUT, f"fetch exceeded its total timeout of {timeout:.3g} s") from None
        except asyncio.CancelledError:
            outcome.error_kind, outcome.error_message = ErrorKind.CANCELLED, "cancelled by the caller"
            raise
        except Exception as exc:
            via_proxy = outcome.pool not in ("", DIRECT)
            to_proxy = via_proxy and recorder is not None and recorder.failed_step in ("connect", "proxy.connect")
            outcome.error_kind, outcome.error_message = classify(exc, via_proxy=via_proxy, connecting_to_proxy=to_proxy)
            if outcome.error_kind is ErrorKind.INTERNAL:
                logger.exception("fetch of %s failed unexpectedly", redact_url(spec.url))
        finally:
            outcome.timings = recorder.timings(time.monotonic() - started) if recorder else outcome.timings
            outcome.timings.total = time.monotonic() - started
            if self.observer is not None:
                self.observer.fetch_finished(token, outcome, recorder)
        return outcome

    def _check(self, spec: FetchSpec) -> tuple[str, httpx.URL, float]:
        """Validate a spec; raises FetchFailed with INVALID_URL or INVALID_ARGUMENT."""
        try:
            url = httpx.URL(spec.url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise FetchFailed(ErrorKind.INVALID_URL, f"invalid URL: {exc}") from None
        if url.scheme not in ("http", "https"):
            raise FetchFailed(
                ErrorKind.INVALID_URL,
                f"unsupported scheme {url.scheme!r}: only http and https" if url.scheme else "URL is not absolute",
            )
        if not url.host:
            raise FetchFailed(ErrorKind.INVALID_URL, "URL has no host")
        if not _HOST.match(url.raw_host):
            raise FetchFailed(ErrorKind.INVALID_URL, f"invalid host {url.host!r}")
        if url.port is not None and not 0 < url.port < 65536:
            raise FetchFailed(ErrorKind.INVALID_URL, f"port {url.port} is out of range")
        method = (spec.method or "GET").upper()
        if not _TOKEN.match(method):
            raise FetchFailed(ErrorKind.INVALID_ARGUMENT, f"invalid method {spec.method!r}")
        for name, value in spec.headers:
            if not _TOKEN.match(name) or _BAD_VALUE.search(value):
                raise FetchFailed(ErrorKind.INVALID_ARGUMENT, f"invalid header {name!r}")
        limits = self.settings.timeouts
        timeout = limits.request if spec.timeout is None else spec.timeout
        if not (0 < timeout <= limits.max_request):
            raise FetchFailed(
                ErrorKind.INVALID_ARGUMENT, f"timeout must be in (0, {limits.max_request:.0f}] seconds, got {timeout}"
            )
        if spec.max_body_bytes < 0:
            raise FetchFailed(ErrorKind.INVALID_ARGUMENT, "max_body_bytes must not be negative")
        return method, url, timeout

    async def _exchange(
        self, spec: FetchSpec, method: str, url: httpx.URL, pool: Pool, recorder: PhaseRecorder, outcome: Outcome
    ) -> None:
        """Send, follow redirects, read the body; fills ``outcome``; raises on failure."""
        fetch = self.settings.fetch
        follow = fetch.follow_redirects if spec.follow_redirects is None else spec.follow_redirects
        cap = min(spec.max_body_bytes or fetch.max_body_bytes, fetch.max_body_bytes)
        request = self.client.build_request(
            method,
            url,
            headers=spec.headers,
            content=spec.body or None,
            extensions={POOL_EXTENSION: pool.name, "trace": recorder.trace},
        )
        seen = {str(url)}
        stale_retry_left = method in IDEMPOTENT
        while True:
            host = _origin(request.url)
            wait = recorder.acquire_started(pool.name)
            try:
                await pool.admission.acquire(host, pool.limits.pool_timeout)
            except AdmissionTimeout:
                pool.pool_timeouts_total += 1
                raise FetchFailed(
                    ErrorKind.POOL_TIMEOUT, f"no connection of pool {pool.name} free within {pool.limits.pool_timeout:g} s"
                ) from None
            outcome.attempts += 1
            try:
                response = await self.client.send(request, stream=True)
                try:
                    pool.record(wait=max(0.0, wait.end - wait.start), reused=not recorder.connected)
                    outcome.connection_reused = not recorder.connected
                    outcome.body = await self._read_body(response, cap, recorder)
                finally:
                    await response.aclose()
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                # A pooled keep-alive connection the server closed meanwhile fails on its
                # first write/read; retry an idempotent request once on a new connection
                # (what Go's net/http does for a broken reused connection).
                if stale_retry_left and not recorder.connected and not recorder.responded:
                    stale_retry_left = False
                    continue
                raise
            finally:
                recorder.finish_attempt()
                pool.admission.release(host)
            outcome.status_code = response.status_code
            outcome.http_version = response.http_version
            outcome.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]
            outcome.final_url = str(response.url)
            next_request = response.next_request
            if not (follow and next_request is not None):
                return
            if len(seen) > fetch.max_redirects:
                raise FetchFailed(ErrorKind.TOO_MANY_REDIRECTS, f"more than {fetch.max_redirects} redirects")
            target = str(next_request.url)
            if target in seen:
                raise FetchFailed(ErrorKind.TOO_MANY_REDIRECTS, f"redirect loop back to {redact_url(target)}")
            seen.add(target)
            request = next_request

    @staticmethod
    async def _read_body(response: httpx.Response, cap: int, recorder: PhaseRecorder) -> bytes:
        """Read the decoded body, failing with TOO_LARGE as soon as it passes ``cap`` bytes."""
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap \
                and "content-encoding" not in response.headers:
            raise FetchFailed(ErrorKind.TOO_LARGE, f"body of {declared} bytes exceeds the limit of {cap} bytes")
        start = time.monotonic()
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > cap:
                raise FetchFailed(ErrorKind.TOO_LARGE, f"body exceeds the limit of {cap} bytes")
            chunks.append(chunk)
        recorder.add("response.body", start, time.monotonic(), size=size)
        return b"".join(chunks)
