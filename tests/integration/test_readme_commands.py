"""The README's own commands, run the way a newcomer runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from fetchpool.config import option_table
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import AppServer, Nginx, free_port
from support.fetchpool_service import FetchpoolService

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_shows_the_two_commands_and_ci_runs_make_test() -> None:
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", README, re.S))
    assert re.search(r"^make run\b", blocks, re.M) and re.search(r"^make test\b", blocks, re.M)
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_readme_configuration_table_is_current() -> None:
    assert option_table() in README, (
        "regenerate the table: python -c 'from fetchpool.config import option_table; print(option_table())'"
    )


def test_readme_names_what_make_test_installs_and_what_make_lint_runs() -> None:
    script = (ROOT / "scripts/install-system-deps.sh").read_text()
    packages = re.search(r"^readonly PACKAGES=\(([^)]*)\)", script, re.M).group(1).split()  # type: ignore[union-attr]
    assert packages and [p for p in packages if p not in README] == []
    recipe = re.search(r"^lint:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)  # type: ignore[union-attr]
    tools = re.findall(r"\$\(BIN\)/([\w-]+)", recipe)
    [line] = [line for line in README.splitlines() if line.startswith("make lint")]
    assert tools and [t for t in tools if t not in line] == [], line


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_make_run_then_fetch(nginx: Nginx, site_root: Path, tmp_path: Path) -> None:
    """The README's `make run` and `fetchpool fetch`, on a free port (FETCHPOOL_LISTEN, --target) so that
    a developer's own `make run` or a second test run on this machine cannot collide with it."""
    target = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FETCHPOOL_", "OTEL_"))}
    env["FETCHPOOL_ALLOW_TARGETS"] = "127.0.0.0/8"  # the test nginx is on loopback, which make run refuses
    env["FETCHPOOL_LISTEN"] = target
    log = (tmp_path / "make-run.log").open("wb")
    make = subprocess.Popen(
        ["make", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300  # a first `make run` may still have to build the venv
        while not _serving(target):
            assert make.poll() is None, (tmp_path / "make-run.log").read_text()
            assert time.monotonic() < deadline, "make run never served"
            time.sleep(0.2)
        url = f"{nginx.http_url}/small.html?readme=1"
        fetch = subprocess.run(
            [sys.executable, "-m", "fetchpool", "fetch", url, "--target", target, "--body", "text"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert fetch.returncode == 0, fetch.stderr
        [line] = fetch.stdout.splitlines()
        result = json.loads(line)
        assert result["status_code"] == 200 and result["url"] == url
        assert result["text"] == (site_root / "small.html").read_text()
        # A second `make run` on the same address says what to do, and nothing of gRPC core's.
        second = subprocess.run(["make", "run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                                check=False)
        assert second.returncode != 0 and "add_port.cc" not in second.stderr, second.stderr
        assert (f"fetchpool serve: {target} is in use (another fetchpool?); set FETCHPOOL_LISTEN or --listen"
                in second.stderr), second.stderr
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(30)
        log.close()


def _python_example() -> str:
    """The README's Python example (the ```python block after "<!-- python-client -->")."""
    return re.search(r"```python\n(.*?)```", README.split("<!-- python-client -->")[1], re.S).group(1)  # type: ignore[union-attr]


def test_the_python_example_runs_and_shows_errors_first(service: FetchpoolService, nginx: Nginx,
                                                        app_server: AppServer, site_root: Path, tmp_path: Path) -> None:
    """Against a site that answers, and one whose redirects never end: such a result has a status
    (302) and an error (TOO_MANY_REDIRECTS), and the example must show the error. Each page's text
    is shown, the batch's too (the server sends text only when asked: include_text)."""
    start = repr((site_root / "small.html").read_text()[:40])
    for site, good in [(f"{nginx.http_url}/small.html", True), (f"{app_server.http_url}/redirect/30", False)]:
        script = tmp_path / "example.py"
        script.write_text(_python_example().replace("127.0.0.1:50051", service.target)
                          .replace("http://127.0.0.1:8000/", site))
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == 101, done.stdout
        if good:
            assert all(" 200 " in line and "TOO_MANY_REDIRECTS" not in line for line in lines), done.stdout
            assert start != "''" and all(line.endswith(f" {start}") for line in lines), done.stdout
        else:
            assert all("TOO_MANY_REDIRECTS" in line and " 302 " not in line for line in lines), done.stdout
