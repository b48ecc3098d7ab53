"""``fetchpool operator`` / ``python -m fetchpool.operator``: argument handling before kopf starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fetchpool.operator import build_parser, main


def test_defaults() -> None:
    args = build_parser().parse_args([])
    assert (args.resync_interval, args.delivery_timeout, args.retry_interval, args.watch_timeout) == (30, 2, 2, 60)
    assert not args.all_namespaces and args.namespace == [] and not args.standalone


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resync-interval", "0"], "--resync-interval must be > 0"),
        (["--tls-cert", "/nonexistent/cert.pem"], "needs both the certificate and the key file"),
    ],
)
def test_bad_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_no_cluster_credentials_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["-A", "--standalone"]) == 2
    err = capsys.readouterr().err
    assert "cannot configure the Kubernetes client" in err
    assert err.rstrip().endswith("run it in a pod with a service account (the chart's operator.enabled), or point "
                                 "KUBECONFIG at a kubeconfig file"), err  # the next step


def test_module_entry_point_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fetchpool.operator", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "--all-namespaces" in out and "--liveness" in out and "--peering" in out
