"""The committed stubs, the error kinds and the pinned httpcore and OTLP exporter internals agree with their sources."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
from fetchpool.engine import _httpcore
from fetchpool.engine._httpcore import checks
from fetchpool.errors import ConfigError, ErrorKind
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
    pb_stub = (ROOT / "service/fetchpool/v1/fetch_pb2.py").read_text()
    pb_made = re.search(r"^# Protobuf Python Version: ([0-9.]+)$", pb_stub, re.M)
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


def test_the_engine_checks_the_internals_it_builds_on() -> None:
    # engine/_httpcore replaces httpcore methods and reads private attributes: verify() passes
    # for the locked versions, and the live-limit attributes it writes are the pool's.
    _httpcore.verify()
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=7, max_keepalive_connections=3))
    pool = transport._pool
    assert (pool._max_connections, pool._max_keepalive_connections) == (7, 3)
    _httpcore.apply_limits(transport, max_connections=9, max_keepalive_connections=4, keepalive_expiry=2.0)
    assert (pool._max_connections, pool._max_keepalive_connections, pool._keepalive_expiry) == (9, 4, 2.0)
    assert _httpcore.connections(transport) == []


def test_a_changed_internal_stops_the_engine_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    # An upgrade that changes a module the package builds on must fail loudly, naming it,
    # rather than silently turning a fix (or the SSRF guard) into a no-op.
    monkeypatch.setitem(checks.SOURCES, "httpcore._async.http2", "0" * 16)
    checks.verify.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"httpcore\._async\.http2 differs"):
            checks.verify()
    finally:
        checks.verify.cache_clear()


def test_a_missing_attribute_stops_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "_POOL_ATTRIBUTES", (*checks._POOL_ATTRIBUTES, "_renamed_in_a_release"))
    checks.verify.cache_clear()
    try:
        with pytest.raises(ConfigError, match="_renamed_in_a_release is gone"):
            checks.verify()
    finally:
        checks.verify.cache_clear()


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
