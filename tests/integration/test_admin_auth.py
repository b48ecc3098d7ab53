"""The admin credential, token rotation and the limits file, against a real ``fetchpool serve`` process.

- ``--admin-token-file``: only its token may call ``PoolAdmin.SetPoolLimits`` (a fetch token gets
  PERMISSION_DENIED, none UNAUTHENTICATED); fetching stays open, or needs the fetch token when one is set.
- Both token files are re-read when they change: a rotated token works without a restart, and a file
  listing two tokens accepts both (rotation without refusing a call).
- The limits file (the operator's ConfigMap) is a start limit: a change lowers the pools still holding
  what the file gave them, never raises one, and never touches a pool set by ``SetPoolLimits``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from fetchpool.client import FetchClient
from fetchpool.v1 import fetch_pb2 as pb
from support import Nginx

ADMIN, FETCH = "admin-secret-1", "fetch-secret-1"


async def _code(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _replace(path: Path, text: str) -> None:
    """Replace ``path`` atomically, as the kubelet does for a Secret or ConfigMap volume."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


async def _eventually(check: Callable[[], Awaitable[bool]], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.1)


async def test_only_the_admin_token_changes_limits_fetch_stays_open(
    start_service: ..., nginx: Nginx, tmp_path: Path
) -> None:
    admin = tmp_path / "admin"
    admin.write_text(ADMIN + "\n")
    service = start_service("--admin-token-file", str(admin))
    url = f"{nginx.http_url}/small.html"
    set_20 = pb.PoolLimits(max_connections=20)
    async with FetchClient(service.target) as anonymous:
        assert (await anonymous.fetch(url)).status_code == 200  # fetch auth is optional and off
        assert await _code(anonymous.pool_stats()) is grpc.StatusCode.OK  # reads change nothing
        assert await _code(anonymous.set_limits(set_20)) is grpc.StatusCode.UNAUTHENTICATED
    async with FetchClient(service.target, token="wrong") as wrong:
        assert await _code(wrong.set_limits(set_20)) is grpc.StatusCode.UNAUTHENTICATED
    async with FetchClient(service.target, token=ADMIN) as operator:
        reply = await operator.set_limits(set_20)
        assert {p.max_connections for p in reply.pools.values()} == {20}
        assert (await operator.fetch(url)).status_code == 200  # the admin token opens every method
    assert ADMIN not in service.output()


async def test_fetch_token_holders_may_not_change_limits(start_service: ..., nginx: Nginx, tmp_path: Path) -> None:
    admin, fetch = tmp_path / "admin", tmp_path / "fetch"
    admin.write_text(ADMIN)
    fetch.write_text(FETCH)
    service = start_service("--admin-token-file", str(admin), "--auth-token-file", str(fetch))
    async with FetchClient(service.target, token=FETCH) as caller:
        assert (await caller.fetch(f"{nginx.http_url}/small.html")).status_code == 200
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await caller.set_limits(pb.PoolLimits(max_connections=5))
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "admin token" in (refused.value.details() or "")
        assert {p.max_connections for p in (await caller.get_limits()).pools.values()} != {5}
    async with FetchClient(service.target) as anonymous:
        assert await _code(anonymous.pool_stats()) is grpc.StatusCode.UNAUTHENTICATED
        assert await anonymous.health() == 1


async def test_rotated_tokens_apply_without_a_restart(start_service: ..., nginx: Nginx, tmp_path: Path) -> None:
    admin, fetch = tmp_path / "admin", tmp_path / "fetch"
    admin.write_text(ADMIN)
    fetch.write_text(FETCH)
    service = start_service("--admin-token-file", str(admin), "--auth-token-file", str(fetch))
    pid = service.pid
    url = f"{nginx.http_url}/small.html"

    async def admin_ok(token: str) -> bool:
        async with FetchClient(service.target, token=token) as client:
            return await _code(client.set_limits(pb.PoolLimits(max_connections=30))) is grpc.StatusCode.OK

    async def fetch_ok(token: str) -> bool:
        async with FetchClient(service.target, token=token) as client:
            return await _code(client.fetch(url)) is grpc.StatusCode.OK

    # Step 1 of a rotation: both tokens listed, both accepted.
    _replace(admin, f"{ADMIN}\nadmin-secret-2\n")
    _replace(fetch, f"{FETCH}\nfetch-secret-2\n")
    await _eventually(lambda: admin_ok("admin-secret-2"), timeout=5, what="the second admin token is accepted")
    await _eventually(lambda: fetch_ok("fetch-secret-2"), timeout=5, what="the second fetch token is accepted")
    assert await admin_ok(ADMIN) and await fetch_ok(FETCH)
    # Step 2: the old ones removed.
    _replace(admin, "admin-secret-2\n")
    _replace(fetch, "fetch-secret-2\n")

    async def old_refused() -> bool:
        return not await admin_ok(ADMIN) and not await fetch_ok(FETCH)

    await _eventually(old_refused, timeout=5, what="the old tokens are refused")
    assert await admin_ok("admin-secret-2") and await fetch_ok("fetch-secret-2")
    # A half-written rotation (an empty file) keeps the tokens in force rather than opening the port.
    _replace(admin, "")
    await asyncio.sleep(1.5)
    assert await admin_ok("admin-secret-2")
    assert not await admin_ok("")
    assert service.pid == pid  # the same process throughout: no restart


async def test_the_limits_file_lowers_untouched_pools_only(start_service: ..., tmp_path: Path) -> None:
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"max_connections": 10, "max_keepalive_connections": 5}))
    admin = tmp_path / "admin"
    admin.write_text(ADMIN)
    service = start_service(
        "--limits-file",
        str(limits),
        "--admin-token-file",
        str(admin),
        "--proxy",
        "http://127.0.0.1:9,http://127.0.0.1:10",
    )
    async with FetchClient(service.target, token=ADMIN) as client:

        async def in_force() -> dict[str, int]:
            return {name: p.max_connections for name, p in (await client.get_limits()).pools.items()}

        pools = sorted(await in_force())
        assert len(pools) == 2 and set((await in_force()).values()) == {10}
        await client.set_limits(pb.PoolLimits(max_connections=40), pool=pools[0])  # the operator's now
        # The file is raised: nothing changes (a new pod would start with 25; running ones keep theirs).
        _replace(limits, json.dumps({"max_connections": 25, "max_keepalive_connections": 5}))
        await asyncio.sleep(6)  # the service checks the file every 5 s
        assert await in_force() == {pools[0]: 40, pools[1]: 10}
        # The file is lowered: the untouched pool follows, the operator's pool is left alone.

        async def lowered() -> bool:
            return await in_force() == {pools[0]: 40, pools[1]: 4}

        _replace(limits, json.dumps({"max_connections": 4, "max_keepalive_connections": 2}))
        await _eventually(lowered, timeout=12, what="the untouched pool lowered to the file's 4")
