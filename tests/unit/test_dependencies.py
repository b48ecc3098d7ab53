"""Installs reproduce: every import is declared, and one lock (uv.lock) is what every install uses."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = tomllib.loads((ROOT / "uv.lock").read_text())


def _name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement (``httpx[http2]>=1`` -> ``httpx``)."""
    return _normalize(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0])


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _local_modules() -> set[str]:
    # Modules of this repository (tests import their helpers by bare name): every .py stem and package.
    names = {path.stem for path in ROOT.rglob("*.py") if ".venv" not in path.parts}
    return names | {path.parent.name for path in ROOT.rglob("__init__.py") if ".venv" not in path.parts}


def _imports(folder: str) -> dict[str, str]:
    """Top-level modules imported under ``folder``, each with one file that imports it."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        if "v1" in path.relative_to(ROOT).parts[:3] and folder == "service":
            continue  # generated stubs import only grpc and protobuf
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                found.setdefault(module.split(".")[0], str(path.relative_to(ROOT)))
    return found


def _undeclared(folder: str, declared: set[str]) -> list[str]:
    local, providers = _local_modules(), importlib.metadata.packages_distributions()
    missing = []
    for module, where in _imports(folder).items():
        if module in sys.stdlib_module_names or module in local or module == "__future__":
            continue
        dists = {_normalize(d) for d in providers.get(module, [])}
        assert dists, f"{where} imports {module!r}, which no installed distribution provides"
        if not dists & declared:
            missing.append(f"{module} ({where}; from {', '.join(sorted(dists))})")
    return missing


def _runtime() -> set[str]:
    return {_name(r) for r in PYPROJECT["project"]["dependencies"]}


def _groups() -> dict[str, set[str]]:
    return {group: {_name(r) for r in reqs} for group, reqs in PYPROJECT["dependency-groups"].items()}


def test_the_service_imports_only_its_runtime_dependencies() -> None:
    assert _undeclared("service", _runtime()) == []


def test_tests_bench_and_scripts_import_only_declared_packages() -> None:
    declared = _runtime().union(*_groups().values())
    for folder in ("tests", "bench", "scripts"):
        assert _undeclared(folder, declared) == [], folder


def test_build_tools_are_not_runtime_dependencies() -> None:
    # The image and a user's `pip install fetchpool` must not carry the code generator.
    runtime = _runtime()
    assert "grpcio-tools" not in runtime
    assert "grpcio-tools" in _groups()["build"]


def test_the_lock_pins_every_declared_package() -> None:
    locked = {_normalize(p["name"]): p["version"] for p in LOCK["package"] if "version" in p}
    declared = _runtime().union(*_groups().values())
    assert declared - locked.keys() == set()
    # What is installed is what the lock says (the venv was synced from it: `make install`).
    for name in declared:
        assert importlib.metadata.version(name) == locked[name], name


def test_the_makefile_bootstraps_the_locked_installer() -> None:
    makefile = (ROOT / "Makefile").read_text()
    bootstrap = re.search(r"^UV_VERSION := (\S+)$", makefile, re.M)
    locked = {p["name"]: p["version"] for p in LOCK["package"]}
    assert bootstrap and bootstrap.group(1) == locked["uv"]
    # Every install path goes through the lock: --locked refuses a lock older than pyproject.toml.
    assert re.search(r"^install:.*\n\t\$\(UV\) sync --locked --all-groups", makefile, re.M)


def test_the_image_installs_from_the_lock_without_build_tools() -> None:
    dockerfile = "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines()
                           if not line.lstrip().startswith("#"))
    locked = {p["name"]: p["version"] for p in LOCK["package"]}
    assert re.search(rf'^ARG UV_VERSION={re.escape(locked["uv"])}$', dockerfile, re.M)
    assert "COPY pyproject.toml uv.lock" in dockerfile
    syncs = re.findall(r"uv sync [^\n]*", dockerfile)
    assert syncs and all("--locked" in s and "--no-dev" in s and "--group" not in s for s in syncs)
    assert "grpc_tools" not in dockerfile and "grpcio-tools" not in dockerfile
