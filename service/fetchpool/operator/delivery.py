"""Deliver per-replica limits to the pods over gRPC (``fetchpool.v1.PoolAdmin``), and read their demand.

Every pod is called concurrently, each under its own deadline (``timeout`` seconds for the whole
exchange with that pod), so a pod that does not answer costs one timeout and never delays the
others; its failure is returned, not raised, and the reconciler reports and retries it.

Security: with :class:`ChannelSecurity` the calls use TLS (pods are dialled by IP, so the name their
certificates carry is given separately) with an optional client certificate (mTLS), and carry
``authorization: Bearer <token>`` with the first token of a file, re-read for every batch of calls,
so a rotated Secret applies without a restart (the pods' admin token: ``--admin-token-file`` of
``fetchpool serve``). The chart passes these as ``FETCHPOOL_OPERATOR_TLS_CA``,
``FETCHPOOL_OPERATOR_TLS_SERVER_NAME``, ``FETCHPOOL_OPERATOR_TLS_CERT``, ``FETCHPOOL_OPERATOR_TLS_KEY``
and ``FETCHPOOL_ADMIN_TOKEN_FILE``.

One exchange per pod (:class:`PodPlan`): ``GetPoolLimits`` (pool names and values in force), then
``SetPoolLimits`` only where a value differs - one call for every pool when they all get the same
limits, otherwise one call per pool, so no pool ever passes through a value above its own budget.
A ``lower_only`` plan only ever lowers (a pool below the target keeps its value). The response of
each ``SetPoolLimits`` is checked: the limits it reports in force must be the ones sent.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import duration_pb2

from fetchpool.operator.policy import DEFAULT_POOL, Limits
from fetchpool.v1 import fetch_pb2, fetch_pb2_grpc

__all__ = ["ChannelSecurity", "Delivery", "PodOutcome", "PodPlan", "PodTarget", "PoolExtras"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ChannelSecurity:
    """How to call the pods: PEM file paths for TLS, a token file; all ``None`` = plaintext, no token.

    - ``ca_file``: CA bundle that signed the pods' server certificates (enables TLS).
    - ``server_name``: the name to verify in those certificates (pods are dialled by IP).
    - ``cert_file`` / ``key_file``: client certificate and key, for mTLS (both or neither).
    - ``token_file``: a file holding the bearer token sent as ``authorization: Bearer`` (its first
      non-empty line: during a rotation the file may list the new token first, then the old one).
    """

    ca_file: str | None = None
    server_name: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token_file: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ChannelSecurity:
        """From ``FETCHPOOL_OPERATOR_TLS_{CA,SERVER_NAME,CERT,KEY}`` and ``FETCHPOOL_ADMIN_TOKEN_FILE``."""
        return cls(
            ca_file=env.get("FETCHPOOL_OPERATOR_TLS_CA") or None,
            server_name=env.get("FETCHPOOL_OPERATOR_TLS_SERVER_NAME") or None,
            cert_file=env.get("FETCHPOOL_OPERATOR_TLS_CERT") or None,
            key_file=env.get("FETCHPOOL_OPERATOR_TLS_KEY") or None,
            token_file=env.get("FETCHPOOL_ADMIN_TOKEN_FILE") or None,
        )

    def problems(self) -> list[str]:
        """What is inconsistent or unreadable, as sentences; empty when usable."""
        found = []
        if bool(self.cert_file) != bool(self.key_file):
            found.append("a TLS client certificate needs both the certificate and the key file")
        if (self.cert_file or self.server_name) and not self.ca_file:
            found.append("TLS to the pods needs the CA file (FETCHPOOL_OPERATOR_TLS_CA / --tls-ca)")
        for path in (self.ca_file, self.cert_file, self.key_file, self.token_file):
            if path and not Path(path).is_file():
                found.append(f"{path}: no such file")
        return found

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, read from the files now (certificates may be rotated); ``None``: plaintext."""
        if not self.ca_file:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_file).read_bytes(),
            private_key=Path(self.key_file).read_bytes() if self.key_file else None,
            certificate_chain=Path(self.cert_file).read_bytes() if self.cert_file else None,
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: the bearer token, read from its file now. Raises OSError for an unreadable
        file and ValueError for an empty one."""
        if not self.token_file:
            return ()
        lines = [line.strip() for line in Path(self.token_file).read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{self.token_file}: no token in the file")
        return (("authorization", f"Bearer {lines[0]}"),)

    def channel(self, address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        """A channel to one pod."""
        if credentials is None:
            return grpc.aio.insecure_channel(address)
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.aio.secure_channel(address, credentials, options=options)


@dataclass(frozen=True, kw_only=True, slots=True)
class PodTarget:
    """A ready pod to call: its name and ``host:port`` of its ``PoolAdmin`` service."""

    name: str
    address: str


@dataclass(frozen=True, kw_only=True, slots=True)
class PodPlan:
    """What to put in force on one pod: pool -> limits (:data:`DEFAULT_POOL` for every pool without
    an entry); with ``lower_only`` a value is only ever lowered."""

    target: PodTarget
    limits: Mapping[str, Limits]
    lower_only: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolExtras:
    """Values passed to every pool unchanged by replica count, in seconds (``None``: leave as is)."""

    keepalive_expiry_seconds: float | None = None
    pool_timeout_seconds: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class PodOutcome:
    """The result for one pod: ``ok`` with the ``max_connections`` now in force per pool, or ``error``."""

    name: str
    address: str
    ok: bool
    error: str | None = None
    in_force: Mapping[str, int] = field(default_factory=dict)
    changed: bool = False
    seconds: float = 0.0


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "DEADLINE_EXCEEDED: no answer within the delivery timeout"
    return f"{type(exc).__name__}: {exc}"


def _lowered(have: fetch_pb2.PoolLimits, want: Limits) -> Limits:
    """``want``, but never above what ``have`` holds."""
    conns = min(have.max_connections, want.max_connections)
    keep = min(have.max_keepalive_connections, want.max_keepalive_connections, conns)
    return Limits(max_connections=conns, max_keepalive_connections=keep)


class Delivery:
    """gRPC calls to the pods; ``timeout`` is the per-pod deadline in seconds."""

    def __init__(self, *, timeout: float = 2.0, security: ChannelSecurity | None = None) -> None:
        self.timeout = timeout
        self.security = security or ChannelSecurity()

    async def push(self, plans: Sequence[PodPlan], extras: PoolExtras = PoolExtras()) -> list[PodOutcome]:
        """Carry out every plan concurrently (each pod under its own deadline); never raises."""
        try:
            credentials, metadata = self.security.credentials(), self.security.metadata()
        except (OSError, ValueError) as exc:  # unreadable certificate or token: every pod fails the same way
            return [
                PodOutcome(name=p.target.name, address=p.target.address, ok=False, error=f"{type(exc).__name__}: {exc}")
                for p in plans
            ]
        return list(await asyncio.gather(*(self._push_one(plan, extras, credentials, metadata) for plan in plans)))

    async def demand(self, pods: Sequence[PodTarget]) -> dict[str, dict[str, float]]:
        """Pod name -> pool -> in-flight + queued requests (``GetPoolStats``); silent pods are left out."""

        try:
            credentials, metadata = self.security.credentials(), self.security.metadata()
        except (OSError, ValueError):
            return {}

        async def one(pod: PodTarget) -> tuple[str, dict[str, float] | None]:
            try:
                async with self.security.channel(pod.address, credentials) as channel:
                    stub = fetch_pb2_grpc.PoolAdminStub(channel)
                    stats = await stub.GetPoolStats(
                        fetch_pb2.GetPoolStatsRequest(), timeout=self.timeout, metadata=metadata
                    )
            except (grpc.aio.AioRpcError, TimeoutError, OSError):
                return pod.name, None
            return pod.name, {p.pool: float(p.requests_active + p.requests_waiting) for p in stats.pools}

        results = await asyncio.gather(*(one(pod) for pod in pods))
        return {name: pools for name, pools in results if pools is not None}

    async def _push_one(
        self,
        plan: PodPlan,
        extras: PoolExtras,
        credentials: grpc.ChannelCredentials | None,
        metadata: tuple[tuple[str, str], ...],
    ) -> PodOutcome:
        pod = plan.target
        start = time.monotonic()
        try:
            in_force, changed = await asyncio.wait_for(
                self._exchange(plan, extras, credentials, metadata), self.timeout
            )
        except (grpc.aio.AioRpcError, TimeoutError, OSError, ValueError) as exc:
            return PodOutcome(
                name=pod.name,
                address=pod.address,
                ok=False,
                error=_describe(exc),
                seconds=time.monotonic() - start,
            )
        return PodOutcome(
            name=pod.name,
            address=pod.address,
            ok=True,
            in_force=in_force,
            changed=changed,
            seconds=time.monotonic() - start,
        )

    async def _exchange(
        self,
        plan: PodPlan,
        extras: PoolExtras,
        credentials: grpc.ChannelCredentials | None,
        metadata: tuple[tuple[str, str], ...],
    ) -> tuple[dict[str, int], bool]:
        deadline = time.monotonic() + self.timeout
        limits = plan.limits
        async with self.security.channel(plan.target.address, credentials) as channel:
            stub = fetch_pb2_grpc.PoolAdminStub(channel)
            current = await stub.GetPoolLimits(
                fetch_pb2.GetPoolLimitsRequest(),
                timeout=max(0.05, deadline - time.monotonic()),
                metadata=metadata,
            )
            wanted = {name: limits.get(name, limits[DEFAULT_POOL]) for name in current.pools}
            if plan.lower_only:
                wanted = {name: _lowered(current.pools[name], want) for name, want in wanted.items()}
            requests: dict[str, fetch_pb2.PoolLimits] = {}
            for name, want in wanted.items():
                have = current.pools[name]
                msg = fetch_pb2.PoolLimits()
                if have.max_connections != want.max_connections:
                    msg.max_connections = want.max_connections
                if have.max_keepalive_connections != want.max_keepalive_connections:
                    msg.max_keepalive_connections = want.max_keepalive_connections
                if have.HasField("max_connections_per_host") and have.max_connections_per_host > want.max_connections:
                    msg.max_connections_per_host = want.max_connections  # the service requires per-host <= max
                if extras.keepalive_expiry_seconds is not None:
                    wanted_expiry = _duration(extras.keepalive_expiry_seconds)
                    if have.keepalive_expiry != wanted_expiry:
                        msg.keepalive_expiry.CopyFrom(wanted_expiry)
                if extras.pool_timeout_seconds is not None:
                    wanted_timeout = _duration(extras.pool_timeout_seconds)
                    if have.pool_timeout != wanted_timeout:
                        msg.pool_timeout.CopyFrom(wanted_timeout)
                if msg.ListFields():
                    requests[name] = msg
            final = current
            if requests:
                distinct = {m.SerializeToString(deterministic=True) for m in requests.values()}
                if len(requests) == len(wanted) and len(distinct) == 1:
                    # Every pool gets the same change: one call (pool "" = every pool).
                    batches = [("", next(iter(requests.values())))]
                else:
                    batches = sorted(requests.items())
                for name, msg in batches:
                    final = await stub.SetPoolLimits(
                        fetch_pb2.SetPoolLimitsRequest(pool=name, limits=msg),
                        timeout=max(0.05, deadline - time.monotonic()),
                        metadata=metadata,
                    )
            in_force = {name: value.max_connections for name, value in final.pools.items()}
            wrong = {
                name: (in_force.get(name), want.max_connections)
                for name, want in wanted.items()
                if in_force.get(name) != want.max_connections
            }
            if wrong:
                detail = ", ".join(f"{n}: {got} != {want}" for n, (got, want) in sorted(wrong.items()))
                raise ValueError(f"limits not in force after SetPoolLimits ({detail})")
            return in_force, bool(requests)
