"""The committed stubs, the error kinds and the pinned httpcore internals agree with their sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpcore
import httpx
from fetchpool.engine import _httpcore_compat
from fetchpool.errors import ErrorKind
from fetchpool.v1 import fetch_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("fetch_pb2.py", "fetch_pb2.pyi", "fetch_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto/fetchpool/v1/fetch.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "fetchpool/v1" / name).read_text()
        committed = (ROOT / "service/fetchpool/v1" / name).read_text()
        assert fresh == committed, f"service/fetchpool/v1/{name} is stale: run `make proto`"


def test_error_kinds_are_the_proto_enum() -> None:
    proto_kinds = {v.name: v.number for v in pb.FetchError.Kind.DESCRIPTOR.values if v.number}
    assert {k.name: k.value for k in ErrorKind} == proto_kinds


def test_httpcore_internals_are_the_checked_versions() -> None:
    # _httpcore_compat reaches into private attributes; re-read it against a new release
    # (AsyncHTTPTransport._pool, AsyncConnectionPool._max_connections and friends) before bumping.
    assert {"httpx": httpx.__version__, "httpcore": httpcore.__version__} == _httpcore_compat.CHECKED_VERSIONS
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=7, max_keepalive_connections=3))
    pool = transport._pool
    assert (pool._max_connections, pool._max_keepalive_connections) == (7, 3)
    _httpcore_compat.apply_limits(transport, max_connections=9, max_keepalive_connections=4, keepalive_expiry=2.0)
    assert (pool._max_connections, pool._max_keepalive_connections, pool._keepalive_expiry) == (9, 4, 2.0)
    assert _httpcore_compat.connections(transport) == []
