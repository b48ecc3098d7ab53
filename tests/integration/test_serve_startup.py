"""`fetchpool serve` refuses bad settings at start-up: one clear line on stderr and status 2, never
a traceback and never a service that starts on something else than what was asked (real processes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from fetchpool.config import OPTIONS
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import free_port
from support.cli import run_cli

STARTUP = 60  # seconds: a refusal comes within a few; a service that starts instead runs until killed


def _refused(*args: str, env: dict[str, str] | None = None) -> str:
    """Run ``fetchpool serve ARGS`` (on a free port unless ARGS say --listen) and return its stderr,
    asserting that it exited with status 2 without a traceback."""
    listen = [] if "--listen" in args or "FETCHPOOL_LISTEN" in (env or {}) else ["--listen",
                                                                                 f"127.0.0.1:{free_port()}"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FETCHPOOL_", "OTEL_"))}
    try:
        done = subprocess.run([sys.executable, "-m", "fetchpool", "serve", *listen, *args],
                              env={**environ, **(env or {})}, capture_output=True, text=True, timeout=STARTUP,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"fetchpool serve {' '.join(args)} started instead of refusing: {exc.stderr!r}") from None
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


@pytest.mark.parametrize("content", ["root:x:0:0:root:/root:/bin/bash\n",
                                     "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_a_ca_bundle_that_is_not_pem_is_a_config_error(tmp_path: Path, content: str) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text(content)
    err = _refused("--ca-bundle", str(bundle))
    assert err.startswith(f"fetchpool serve: CA bundle '{bundle}' is not a PEM file of CA certificates: "), err
    err = _refused(env={"FETCHPOOL_CA_BUNDLE": str(bundle)})
    assert f"CA bundle '{bundle}' is not a PEM file" in err


@pytest.mark.parametrize(("flag", "variable", "what"), [("--deny-targets", "FETCHPOOL_DENY_TARGETS", "denied"),
                                                        ("--allow-targets", "FETCHPOOL_ALLOW_TARGETS", "allowed")])
def test_a_mistyped_target_rule_is_refused_by_flag_and_by_variable(flag: str, variable: str, what: str) -> None:
    for rules, bad, why in [("10.0.0.0/8,127.0.0.1/33", "127.0.0.1/33", "not a valid address or CIDR"),
                            ("300.1.1.1/8", "300.1.1.1/8", "not a valid address or CIDR"),
                            ("*.corp.example,corp_intranet", "corp_intranet", "neither an address, a CIDR nor")]:
        for err in (_refused(flag, rules), _refused(env={variable: rules})):
            assert err.startswith(f"fetchpool serve: {what} target '{bad}' is {why}"), err


def test_a_value_that_is_not_a_number_is_said_so_naming_the_flag_or_variable() -> None:
    """In the words of `fetchpool fetch` (not Python's "invalid literal for int()"), naming what the user set."""
    for given, source, why in [
        (("--max-connections", "abc"), "--max-connections", "not a number: 'abc'"),
        (("--max-connections", "1.5"), "--max-connections", "not a whole number: '1.5'"),
        (("--connect-timeout", "soon"), "--connect-timeout", "not a number: 'soon'"),
        ({"FETCHPOOL_RETRY_STATUSES": "429,abc"}, "FETCHPOOL_RETRY_STATUSES", "not a number: 'abc'"),
        ({"FETCHPOOL_KEEPALIVE_EXPIRY": "5s"}, "FETCHPOOL_KEEPALIVE_EXPIRY", "not a number: '5s'"),
        ({"FETCHPOOL_SSRF_GUARD": "nope"}, "FETCHPOOL_SSRF_GUARD",
         "not a boolean: 'nope' (true/yes/on/1 or false/no/off/0)"),
    ]:
        err = _refused(env=given) if isinstance(given, dict) else _refused(*given)
        assert err == f"fetchpool serve: {source}: {why}\n", err


def test_a_value_out_of_range_is_the_one_error_and_names_the_flag_or_variable_given() -> None:
    """Only the value given is at fault, not the limits derived from it; flags and variables are
    named as the user wrote them, and a default at fault says so."""
    assert _refused("--max-connections", "-1") == "fetchpool serve: --max-connections: must be in 1..100000, got -1\n"
    assert _refused(env={"FETCHPOOL_MAX_CONNECTIONS": "-1"}) == (
        "fetchpool serve: FETCHPOOL_MAX_CONNECTIONS: must be in 1..100000, got -1\n")
    assert _refused("--max-connections", "5", env={"FETCHPOOL_MAX_KEEPALIVE_CONNECTIONS": "6"}) == (
        "fetchpool serve: FETCHPOOL_MAX_KEEPALIVE_CONNECTIONS: must be in 0..--max-connections (5), got 6\n")
    assert _refused("--max-batch-concurrency", "10") == (
        "fetchpool serve: --batch-concurrency (default): must be in 1..--max-batch-concurrency (10), got 64\n")


def test_a_listen_address_grpc_would_wrap_or_misread_is_refused() -> None:
    for listen, why in [("127.0.0.1:99999", "port 99999 of '127.0.0.1:99999' is out of range (0-65535"),
                        ("::1:50051", "'::1:50051': an IPv6 address goes in brackets"),
                        ("127.0.0.1", "'127.0.0.1' has no port")]:
        for err in (_refused("--listen", listen), _refused(env={"FETCHPOOL_LISTEN": listen})):
            assert err.startswith(f"fetchpool serve: listen address: {why}"), err


def test_port_0_listens_on_a_free_port_and_says_which() -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FETCHPOOL_", "OTEL_"))}
    process = subprocess.Popen([sys.executable, "-m", "fetchpool", "serve", "--listen", "127.0.0.1:0"],
                               env=environ, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        line = next((line for line in process.stderr if "serving on" in line or "Traceback" in line), "")
        port = int(re.search(r"serving on 127\.0\.0\.1:(\d+) ", line).group(1))  # type: ignore[union-attr]
        assert port > 0
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        process.terminate()
        process.wait(30)


def test_a_listen_address_in_use_is_said_to_be_in_use(start_service: ...) -> None:
    running = start_service()
    for err in (_refused("--listen", running.target), _refused(env={"FETCHPOOL_LISTEN": running.target})):
        assert err == (f"fetchpool serve: {running.target} is in use (another fetchpool?); set FETCHPOOL_LISTEN or "
                       "--listen to another address\n"), err  # and nothing from gRPC core (add_port.cc, ...)
    assert running.running


def test_serve_help_shows_placeholders_env_variables_and_defaults_as_they_are_written() -> None:
    done = run_cli("serve", "--help")
    assert done.status == 0, done.err
    usage, _, options = done.out.partition("\noptions:\n")
    assert "FETCHPOOL_" not in usage, usage  # a placeholder is no variable's name
    assert "[--ssrf-guard [BOOL]]" in usage and "[--max-connections N]" in usage and "[--proxy URL,...]" in usage
    flat = " ".join(options.split())  # argparse wraps the help to the terminal's width
    for option in OPTIONS:
        assert f"(env {option.env}; default " in flat, option.flag
    for python in ("default ()", "default None", "default (429, 503)", "default True", "default False", "5.0)"):
        assert python not in flat, python
    assert "(env FETCHPOOL_RETRY_STATUSES; default 429,503)" in flat
    assert "(env FETCHPOOL_PROXY; default none)" in flat and "(env FETCHPOOL_KEEPALIVE_EXPIRY; default 5)" in flat
    assert "(env FETCHPOOL_SSRF_GUARD; default true; false turns it off)" in flat
    assert "(env FETCHPOOL_DYNAMIC_LIMITS; default false; the flag alone turns it on)" in flat
    assert "a BOOL is true/yes/on/1 or false/no/off/0 (any case)" in " ".join(usage.split())


@pytest.mark.parametrize("word", ["false", "No", "OFF", "0"])
def test_every_word_the_help_names_turns_the_guard_off_and_the_service_warns(start_service: ..., word: str) -> None:
    service = start_service("--ssrf-guard", word)
    warning = ("WARNING fetchpool.server.app: SSRF guard off (--ssrf-guard false): fetches may reach loopback, "
               "private and link-local addresses, the cloud metadata service (169.254.169.254) included; only "
               "--deny-targets are refused, and there are none")
    assert warning in service.output(), service.output()


def test_the_guard_on_by_default_or_by_a_word_gives_no_warning(start_service: ...) -> None:
    for running in (start_service(), start_service("--ssrf-guard", "yes", env={"FETCHPOOL_SSRF_GUARD": "off"})):
        assert "SSRF guard off" not in running.output(), running.output()
