"""The chart's in-cluster programs run for real against `fetchpool serve` on loopback.

- The service starts with exactly the environment the chart renders (ConfigMap + env).
- The `helm test` pod's program (gRPC health, then one fetch of a page it serves) passes.
- The exec health probe used under TLS passes (plaintext here; with TLS when the service has it).
- SIGTERM drains within the grace period the chart gives the pod.

Only 127.0.0.1 is used. Skipped while `fetchpool serve` is not importable.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chartlib
import pytest
from chartlib import env_of

pytest.importorskip("fetchpool.server", reason="the service is not importable yet")
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PYTHON = sys.executable
FETCHPOOL = [sys.executable, "-m", "fetchpool"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_env(container: dict[str, Any], extra: dict[str, str]) -> dict[str, str]:
    """The container's literal env (downward-API values stood in for), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FETCHPOOL_", "OTEL_", "FP_"))}
    stand_ins = {
        "metadata.name": "demo-fetchpool-abc12",
        "metadata.namespace": chartlib.NAMESPACE,
        "spec.nodeName": "node-1",
        "status.podIP": "127.0.0.1",
        "metadata.uid": "uid-1",
    }
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = stand_ins[e["valueFrom"]["fieldRef"]["fieldPath"]]
    for name, value in list(env.items()):  # the kubelet's $(VAR) expansion
        for ref, sub in env.items():
            value = value.replace(f"$({ref})", sub)
        env[name] = value
    env.update(extra)
    return env


def wait_serving(
    target: str,
    timeout: float = 30.0,
    credentials: grpc.ChannelCredentials | None = None,
    options: list[tuple[str, str]] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        channel = (
            grpc.secure_channel(target, credentials, options or []) if credentials else grpc.insecure_channel(target)
        )
        try:
            with channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{target} not SERVING after {timeout} s")
        time.sleep(0.2)


class Server:
    def __init__(self, env: dict[str, str], port: int):
        self.env = env
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [*FETCHPOOL, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        out, _ = self.proc.communicate(timeout=10)
        return out


def start_server(
    rendered: chartlib.Rendered, extra: dict[str, str] | None = None, *, allow_loopback: bool = True
) -> Server:
    """``fetchpool serve`` with the rendered environment. ``allow_loopback`` adds 127.0.0.0/8 to the
    SSRF guard's allow list (the tests' targets live on loopback); False keeps the chart's own."""
    port = free_port()
    env = pod_env(rendered.server_container(), {})
    env.update(rendered.configmap_env())  # envFrom (env entries win; none overlap)
    env["FETCHPOOL_LISTEN"] = f"127.0.0.1:{port}"
    if allow_loopback:
        env["FETCHPOOL_ALLOW_TARGETS"] = "127.0.0.0/8"
    if "FETCHPOOL_ADMIN_TOKEN_FILE" in env:
        env["FETCHPOOL_ADMIN_TOKEN_FILE"] = str(project_admin_token(rendered))
    env.update(extra or {})
    return Server(env, port)


def project_admin_token(rendered: chartlib.Rendered) -> Path:
    """The kubelet's projection of the admin Secret: a file holding the token - the chart's generated
    one, or a stand-in for the user's own Secret (adminAuth.existingSecret)."""
    import base64
    import tempfile

    generated = [o for o in rendered.all("Secret") if o["metadata"]["name"].endswith("-admin")]
    path = Path(tempfile.mkdtemp(prefix="fetchpool-admin-")) / "token"
    path.write_bytes(base64.b64decode(generated[0]["data"]["token"]) if generated else b"users-own-admin-token\n")
    return path


def start_serving(rendered: chartlib.Rendered, **kwargs: Any) -> Server:
    srv = start_server(rendered, **kwargs)
    try:
        wait_serving(srv.target)
    except AssertionError:
        pytest.fail("fetchpool serve did not start with the chart's environment:\n" + srv.stop())
    return srv


# The helm test's self-served page (tests.fetchUrl empty), allowed through the SSRF guard by values
# (in a cluster: the pod network; here the pod "IP" is 127.0.0.1).
SELF_SERVED_PAGE = {"tests": {"fetchUrl": ""}, "ssrf": {"allowTargets": ["127.0.0.0/8"]}}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = start_server(chartlib.render("default"))
    try:
        wait_serving(srv.target)
    except AssertionError:
        pytest.fail("fetchpool serve did not start with the chart's environment:\n" + srv.stop())
    yield srv
    srv.stop()


def run_program(
    container: dict[str, Any], extra: dict[str, str], timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    command = container.get("command") or container["exec"]["command"]
    assert command[0] == "python3"
    return subprocess.run(
        [PYTHON, *command[1:]], env=pod_env(container, extra), capture_output=True, text=True, timeout=timeout
    )


def test_helm_test_program_passes() -> None:
    """The self-served page through a service whose SSRF allow list is the chart's own rendering."""
    rendered = chartlib.render(SELF_SERVED_PAGE)
    assert rendered.configmap_env()["FETCHPOOL_ALLOW_TARGETS"] == "127.0.0.0/8"
    srv = start_serving(rendered, allow_loopback=False)
    try:
        (container,) = rendered.get("Pod", "demo-fetchpool-test")["spec"]["containers"]
        proc = run_program(container, {"FP_TARGET": srv.target, "FP_HTTP_PORT": str(free_port())})
    finally:
        srv.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "health '' SERVING" in proc.stdout
    assert "health 'fetchpool.v1.FetchService' SERVING" in proc.stdout
    assert '"status_code": 200' in proc.stdout and proc.stdout.rstrip().endswith("ok")


def test_helm_test_page_is_refused_by_the_default_ssrf_guard() -> None:
    """Why the chart insists on ssrf.allowTargets for the self-served page: with the default guard
    the service refuses the test pod's (cluster-internal) address."""
    srv = start_serving(chartlib.render("default"), allow_loopback=False)
    try:
        (container,) = chartlib.render(SELF_SERVED_PAGE).get("Pod")["spec"]["containers"]
        proc = run_program(container, {"FP_TARGET": srv.target, "FP_HTTP_PORT": str(free_port())})
    finally:
        srv.stop()
    assert proc.returncode != 0 and "FORBIDDEN_TARGET" in proc.stdout, proc.stdout + proc.stderr


def test_metrics_endpoint_serves_demand_with_otlp_off() -> None:
    """metrics.enabled without OTLP: exporters `none`, and the Prometheus endpoint still serves
    fetchpool_demand_requests (with OTEL_SDK_DISABLED=true the SDK's meters would be no-ops)."""
    import urllib.request

    port = free_port()
    while port < 1024:  # the schema wants an unprivileged port
        port = free_port()
    rendered = chartlib.render({"metrics": {"enabled": True, "port": port}})
    assert rendered.configmap_env()["OTEL_METRICS_EXPORTER"] == "none"
    srv = start_serving(rendered)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                    text = response.read().decode()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        out = srv.stop()
    assert "\nfetchpool_demand_requests" in "\n" + text, text[:2000] + out


def test_a_default_install_lets_only_the_admin_token_change_limits(server: Server) -> None:
    """The default install: fetching needs nothing, SetPoolLimits needs the generated admin token
    (the one the operator's pod mounts from the same Secret)."""
    from fetchpool.v1 import fetch_pb2, fetch_pb2_grpc

    rendered = chartlib.render("default")
    operator_env = env_of(rendered.operator()["spec"]["template"]["spec"]["containers"][0])
    assert operator_env["FETCHPOOL_ADMIN_TOKEN_FILE"]["value"] == "/etc/fetchpool/admin/token"
    token = Path(server.env["FETCHPOOL_ADMIN_TOKEN_FILE"]).read_text()
    assert len(token) == 48 and token.isalnum()
    request = fetch_pb2.SetPoolLimitsRequest(limits=fetch_pb2.PoolLimits(max_connections=42))
    with grpc.insecure_channel(server.target) as channel:
        stub = fetch_pb2_grpc.PoolAdminStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SetPoolLimits(request, timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        reply = stub.SetPoolLimits(request, timeout=5, metadata=[("authorization", f"Bearer {token}")])
        assert {p.max_connections for p in reply.pools.values()} == {42}
        stats = stub.GetPoolStats(fetch_pb2.GetPoolStatsRequest(), timeout=5)  # reads stay open
        assert stats.pools


def test_helm_test_program_fails_when_the_fetch_fails(server: Server) -> None:
    pod = chartlib.render({"tests": {"fetchUrl": f"http://127.0.0.1:{free_port()}/nothing-listens"}}).get("Pod")
    (container,) = pod["spec"]["containers"]
    proc = run_program(container, {"FP_TARGET": server.target})
    assert proc.returncode != 0, proc.stdout


def test_exec_health_probe_program(server: Server) -> None:
    """The exec probe the chart uses under TLS runs the same Health check (here in plaintext)."""
    rendered = chartlib.render("tls")
    container = rendered.server_container()
    for probe, service in (("livenessProbe", ""), ("readinessProbe", "fetchpool.v1.FetchService")):
        command = container[probe]["exec"]["command"]
        assert command[-1] == service
        env = {"FP_TARGET": server.target, "FP_TLS_CA": "", "FP_TLS_CERT": "", "FP_TLS_KEY": "", "FP_TOKEN_FILE": ""}
        proc = run_program({"env": container["env"], "command": command}, env, timeout=30)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "SERVING" in proc.stdout
    # Against nothing, the probe fails (and so would restart / unready the pod).
    proc = run_program(
        {"env": container["env"], "command": command},
        {"FP_TARGET": f"127.0.0.1:{free_port()}", "FP_TLS_CA": "", "FP_TOKEN_FILE": "", "FP_TIMEOUT": "1"},
        timeout=30,
    )
    assert proc.returncode != 0


def test_exec_health_probe_over_mtls(tmp_path: Path) -> None:
    config = pytest.importorskip("fetchpool.config")
    envs = {o.env for o in config.OPTIONS}
    if not {"FETCHPOOL_TLS_CERT", "FETCHPOOL_TLS_KEY", "FETCHPOOL_TLS_CLIENT_CA"} <= envs:
        pytest.skip("the service does not read FETCHPOOL_TLS_* yet")
    trustme = pytest.importorskip("trustme")
    rendered = chartlib.render("tls")
    server_name = "demo-fetchpool.prod.svc"
    ca = trustme.CA()
    server_cert = ca.issue_cert(server_name)
    client_cert = ca.issue_cert("demo-fetchpool-operator")
    tls_dir, client_dir = tmp_path / "tls", tmp_path / "client-tls"
    for directory, cert in ((tls_dir, server_cert), (client_dir, client_cert)):
        directory.mkdir()
        cert.cert_chain_pems[0].write_to_path(str(directory / "tls.crt"))
        cert.private_key_pem.write_to_path(str(directory / "tls.key"))
        ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    cm = rendered.configmap_env()
    paths = {
        k: cm[k].replace("/etc/fetchpool/tls", str(tls_dir))
        for k in ("FETCHPOOL_TLS_CERT", "FETCHPOOL_TLS_KEY", "FETCHPOOL_TLS_CLIENT_CA")
    }
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    srv = start_server(rendered, {**paths, "FETCHPOOL_AUTH_TOKEN_FILE": str(token), "FETCHPOOL_CA_BUNDLE": ""})
    try:
        container = rendered.server_container()
        env = {"FP_TARGET": srv.target, "FP_TOKEN_FILE": str(token)}
        for e in container["env"]:
            if e["name"].startswith("FP_TLS_") and "value" in e:
                env[e["name"]] = e["value"].replace("/etc/fetchpool/client-tls", str(client_dir))
        deadline = time.monotonic() + 30
        while True:
            proc = run_program(
                {"env": container["env"], "command": container["readinessProbe"]["exec"]["command"]}, env, timeout=30
            )
            if proc.returncode == 0 or time.monotonic() > deadline or srv.proc.poll() is not None:
                break
            time.sleep(0.5)
        assert proc.returncode == 0, proc.stdout + proc.stderr + srv.stop()
    finally:
        srv.stop()


def test_sigterm_drains_within_the_pods_grace_period() -> None:
    rendered = chartlib.render("default")
    srv = start_server(rendered)
    try:
        wait_serving(srv.target)
        grace = rendered.server()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=grace)
        assert time.monotonic() - started < grace
        assert srv.proc.returncode == 0, srv.stop()
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "value_set",
    ["default", "keda", "networkpolicy", {"operator": {"peering": {"enabled": False}, "metrics": {"enabled": False}}}],
    ids=["default", "keda", "networkpolicy", "standalone"],
)
def test_operator_args_are_accepted_by_the_cli(value_set: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fetchpool <the operator container's args>` reaches `fetchpool.operator.main` with arguments
    its parser accepts (a flag the CLI rejects would crash-loop the operator pod)."""
    cli = pytest.importorskip("fetchpool.cli")
    operator = pytest.importorskip("fetchpool.operator")
    deployment = chartlib.render(value_set).operator()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    received: list[list[str]] = []
    monkeypatch.setattr(operator, "main", lambda argv=None: received.append(list(argv or [])) or 0)
    try:
        status = cli.main(args)
    except SystemExit as exc:
        pytest.fail(
            f"`fetchpool {' '.join(args)}` exits {exc.code} in fetchpool.cli before reaching the operator "
            "(argparse.REMAINDER does not take arguments that start with '-'; dispatch 'operator' first)"
        )
    assert status == 0 and received, "fetchpool.operator.main was not called"
    parsed = operator.build_parser().parse_args(received[0])
    assert parsed.liveness == "http://0.0.0.0:8080/healthz"
    standalone = isinstance(value_set, dict)
    assert parsed.standalone is standalone
    if standalone:
        assert parsed.peering is None and parsed.metrics is None
    else:
        kind = "ClusterKopfPeering" if value_set == "keda" else "KopfPeering"
        assert parsed.peering in {o["metadata"]["name"] for o in chartlib.render(value_set).all(kind)}
        assert parsed.metrics == "http://0.0.0.0:9090/metrics"
