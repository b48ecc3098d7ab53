"""The generated admin token survives ``helm upgrade``: real Helm looks the Secret up in the cluster.

The chart renders the Secret ``<fullname>-admin`` with a random token at the first install and, on
every later render against the cluster, reads the token back with ``lookup``. This runs the real
``helm`` v3 binary (``helm template --dry-run=server``, the rendering ``helm upgrade`` does, lookups
included) against ``kmock``, a Kubernetes API emulator on loopback - there is no real API server on
these machines; kmock answers the Secret GET that ``lookup`` makes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

import chartlib
import pytest
import yaml

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")


async def helm_render(kmock: Any, tmp: Path, *args: str) -> dict[str, Any] | None:
    """The admin Secret as ``helm template --dry-run=server`` renders it against kmock (None: none)."""
    helm = chartlib.helm_cli()
    assert helm, "helm CLI unavailable (scripts/fetch-helm.sh)"
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
                "users": [{"name": "test", "user": {"token": "test"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
            }
        )
    )
    env = {"HOME": str(tmp), "PATH": os.environ.get("PATH", ""), "KUBECONFIG": str(kubeconfig)}
    process = await asyncio.create_subprocess_exec(
        helm,
        "template",
        chartlib.RELEASE,
        str(chartlib.CHART),
        "-n",
        chartlib.NAMESPACE,
        *(f"--set=image.{key}={value}" for key, value in chartlib.IMAGE.items()),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    secrets = [
        d for d in yaml.safe_load_all(out) if d and d["kind"] == "Secret" and d["metadata"]["name"].endswith("-admin")
    ]
    return secrets[0] if secrets else None


def token_of(secret: dict[str, Any] | None) -> str:
    assert secret is not None
    return base64.b64decode(secret["data"]["token"]).decode()


async def test_the_generated_admin_token_is_kept_across_upgrades(kmock: Any, tmp_path: Path) -> None:
    kmock.resources.load_bundled()
    first = token_of(await helm_render(kmock, tmp_path, "--dry-run=server"))  # the first install
    assert len(first) == 48 and first.isalnum()
    # Without the cluster (plain `helm template`) nothing can be looked up: a new token every time.
    assert token_of(await helm_render(kmock, tmp_path)) != first
    # The install created the Secret; every upgrade renders it back with the same token.
    name = f"{chartlib.RELEASE}-fetchpool-admin"
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": chartlib.NAMESPACE},
        "data": {"token": base64.b64encode(first.encode()).decode()},
    }
    response = await kmock.post(f"/api/v1/namespaces/{chartlib.NAMESPACE}/secrets", json=secret)
    assert response.status == 200
    for _ in range(2):
        assert token_of(await helm_render(kmock, tmp_path, "--dry-run=server")) == first
    # A Secret of one's own: nothing is generated, the pods and the operator mount that one.
    assert await helm_render(kmock, tmp_path, "--dry-run=server", "--set", "adminAuth.existingSecret=mine") is None
