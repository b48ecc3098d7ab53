"""Helpers of the hardening suite: starting services, a blocking gRPC caller, process probes.

Services trust the tests' CA. Targets are all on loopback, which the SSRF guard refuses by
default, so services get ``--allow-targets`` LOOPBACK unless a test says otherwise
(``strict=True``: the guard's built-in deny ranges in force, nothing allowed).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from fetchpool.v1 import fetch_pb2 as pb
from fetchpool.v1 import fetch_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import Certs
from support.fetchpool_service import FetchpoolService

LOOPBACK = "127.0.0.0/8,::1/128"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def make_service(certs: Certs, *flags: str, strict: bool = False, **kwargs: object) -> FetchpoolService:
    """A FetchpoolService (not started) with loopback allowed unless ``strict``."""
    # FetchpoolService allows loopback itself unless --allow-targets or --ssrf-guard is given.
    if strict:
        guard: tuple[str, ...] = ("--ssrf-guard", "true")
    else:
        guard = () if "--allow-targets" in flags else ("--allow-targets", LOOPBACK)
    return FetchpoolService(*guard, *flags, ca_pem=certs.ca_pem, **kwargs)  # type: ignore[arg-type]


class Caller:
    """A blocking gRPC client of one service (grpc's sync API: no event loop needed)."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
        self.fetch_stub = pb_grpc.FetchServiceStub(self.channel)
        self.admin = pb_grpc.PoolAdminStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def fetch(self, request: pb.FetchRequest, timeout: float = 60.0) -> pb.FetchResult:
        return self.fetch_stub.Fetch(request, timeout=timeout)

    def fetch_many(
        self, requests: Sequence[pb.FetchRequest], concurrency: int = 0, timeout: float = 120.0
    ) -> list[pb.FetchResult]:
        call = self.fetch_stub.FetchMany(
            pb.FetchManyRequest(requests=list(requests), concurrency=concurrency), timeout=timeout
        )
        return list(call)

    def stats(self) -> list[pb.PoolStats]:
        return list(self.admin.GetPoolStats(pb.GetPoolStatsRequest(), timeout=10).pools)

    def health(self) -> int:
        return int(self.health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)

    def wait_pool_clean(self, timeout: float = 10.0) -> list[pb.PoolStats]:
        """Poll (bounded) until no pool has a request, a checked-out connection or an HTTP/2 stream."""
        deadline = time.monotonic() + timeout
        while True:
            pools = self.stats()
            if all(p.requests_active == 0 and p.connections_active == 0 and p.http2_streams == 0 for p in pools):
                return pools
            assert time.monotonic() < deadline, f"pool still busy after {timeout} s: {pools}"
            time.sleep(0.1)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Caller:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def running(certs: Certs, *flags: str, **kwargs: object) -> Iterator[tuple[FetchpoolService, Caller]]:
    """A started service and a Caller of it; both closed on exit."""
    with make_service(certs, *flags, **kwargs) as service, Caller(service.target) as caller:
        yield service, caller


def proc_status(pid: int) -> dict[str, int]:
    """Numeric fields of /proc/PID/status in kB (VmRSS, VmHWM, Threads, ...)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0])
    return fields


def socket_count(pid: int) -> int:
    """Open sockets of a process (its fds pointing at socket:[...])."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if fd.readlink().as_posix().startswith("socket:"):
                count += 1
    return count
