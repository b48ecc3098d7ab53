"""The committed stubs, the error kinds and the pinned httpcore and OTLP exporter internals agree with their sources."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpcore
import httpx
from fetchpool.engine import _httpcore_compat
from fetchpool.errors import ErrorKind
from fetchpool.telemetry import _otlp_compat
from fetchpool.v1 import fetch_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("fetch_pb2.py", "fetch_pb2.pyi", "fetch_pb2_grpc.py")


# The version stamps a code generator writes into the stubs: they say which grpcio-tools and
# protobuf made the file, not what the proto says, so a patch release of the tools changes them.
_STAMPS = (
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:    .*\n)+?\)$", re.M),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
)


def _unstamped(source: str) -> str:
    for stamp in _STAMPS:
        source, found = stamp.subn("<stamp>", source)
        assert found <= 1
    return source


def _generate(out: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}",
         f"--pyi_out={out}", f"--grpc_python_out={out}", str(ROOT / "proto/fetchpool/v1/fetch.proto")],
        check=True,
    )


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    # Fails when the proto changed and `make proto` was not run; not when only the installed
    # grpcio-tools differs from the one that made the committed stubs (its stamps are ignored).
    _generate(tmp_path)
    for name in GENERATED:
        fresh = _unstamped((tmp_path / "fetchpool/v1" / name).read_text())
        committed = _unstamped((ROOT / "service/fetchpool/v1" / name).read_text())
        assert fresh == committed, f"service/fetchpool/v1/{name} is stale: run `make proto`"


def test_stub_comparison_sees_a_changed_proto(tmp_path: Path) -> None:
    # The check above cannot pass by ignoring too much: one renamed field makes it fail.
    proto = tmp_path / "proto/fetchpool/v1/fetch.proto"
    proto.parent.mkdir(parents=True)
    proto.write_text((ROOT / "proto/fetchpool/v1/fetch.proto").read_text().replace("session_key", "session_id", 1))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path / 'proto'}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(proto)], check=True)
    for name in ("fetch_pb2.py", "fetch_pb2.pyi"):
        fresh = _unstamped((tmp_path / "fetchpool/v1" / name).read_text())
        assert fresh != _unstamped((ROOT / "service/fetchpool/v1" / name).read_text())


def _lower_bound(requirement: str) -> str:
    match = re.search(r">=\s*([0-9][0-9.]*)", requirement)
    assert match, f"{requirement!r} has no lower bound"
    return match.group(1)


def test_stub_stamps_are_within_the_declared_runtime_ranges() -> None:
    # Generated code refuses to import on a grpcio or protobuf older than the tools that made it:
    # the package's lower bounds must admit it, or a user's install within them breaks at import.
    declared = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]: r for r in _pyproject()["project"]["dependencies"]}
    grpc_stub = (ROOT / "service/fetchpool/v1/fetch_pb2_grpc.py").read_text()
    grpc_made = re.search(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'$", grpc_stub, re.M)
    pb_made = re.search(r"^# Protobuf Python Version: ([0-9.]+)$", (ROOT / "service/fetchpool/v1/fetch_pb2.py").read_text(),
                        re.M)
    assert grpc_made and pb_made
    assert _version(grpc_made.group(1)) <= _version(_lower_bound(declared["grpcio"]))
    assert _version(pb_made.group(1)) <= _version(_lower_bound(declared["protobuf"]))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


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


def test_otlp_exporter_internals_are_the_checked_version() -> None:
    # _otlp_compat replaces the OTLP/gRPC span exporter's encoding through its private
    # _translate_data/_stub/_client; re-read it against a new release before bumping.
    installed = {name: importlib.metadata.version(name) for name in _otlp_compat.CHECKED_VERSIONS}
    assert installed == _otlp_compat.CHECKED_VERSIONS
    exporter = _otlp_compat.GrpcSpanExporter(endpoint="127.0.0.1:9", insecure=True)
    try:
        assert exporter._stub is _otlp_compat._SerializedTraceStub
        assert isinstance(exporter._client, _otlp_compat._SerializedTraceStub)
        assert exporter._translate_data([]) == b""
    finally:
        exporter.shutdown(timeout_millis=100)


class _Conn:
    """A pool entry for the assignment logic (plain data: no I/O happens in that pass)."""

    def __init__(self, origin: str, *, idle: bool = True, expired: bool = False) -> None:
        self.origin, self.idle, self.expired, self.closed = origin, idle, expired, False

    def is_closed(self) -> bool:
        return self.closed

    def is_idle(self) -> bool:
        return self.idle

    def has_expired(self) -> bool:
        return self.expired

    def is_available(self) -> bool:
        return self.idle

    def can_handle_request(self, origin: httpcore.Origin) -> bool:
        return str(origin.host, "ascii") == self.origin


class _Queued:
    def __init__(self, host: str) -> None:
        self.request = httpcore.Request("GET", f"http://{host}/")
        self.connection: object = None

    def is_queued(self) -> bool:
        return self.connection is None

    def assign_to_connection(self, connection: object) -> None:
        self.connection = connection


def test_linear_assignment_counts_idle_connections_and_skips_expired_ones() -> None:
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=6, max_keepalive_connections=2))
    _httpcore_compat.linear_pool_assignment(transport)
    pool = transport._pool
    busy = [_Conn("a", idle=False) for _ in range(3)]
    stale = _Conn("b", expired=True)
    fresh = _Conn("b")
    pool._connections = [*busy, stale, fresh]
    request = _Queued("b")
    pool._requests = [request]
    # httpcore 1.0.9 would close an idle connection here: 5 connections > 2 keep-alive.
    assert pool._assign_requests_to_connections() == [stale]
    assert request.connection is fresh and pool._connections == [*busy, fresh]
    extra = [_Conn("d") for _ in range(3)]
    pool._connections.extend(extra)
    pool._requests = []
    # 4 idle connections, 2 may stay: the last two idle ones are surplus.
    assert pool._assign_requests_to_connections() == extra[1:]
    assert pool._connections == [*busy, fresh, extra[0]]
