"""The FetchPool CRD (``helm/fetchpool/crds/``) agrees with what the operator reads and writes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from fetchpool.operator import resource

CRDS = Path(__file__).resolve().parents[2] / "helm" / "fetchpool" / "crds"
FULL_SPEC: dict[str, Any] = {
    "target": {"kind": "Deployment", "name": "web", "hpaName": "web"},
    "connectionBudget": 600,
    "proxyBudgets": {"http://proxy-a:3128": 60},
    "minPerReplica": 2,
    "maxPerReplica": 200,
    "keepaliveShare": 0.5,
    "mode": "formula",
    "formula": {"concurrency": 8, "latencySeconds": 0.3, "processingTimeSeconds": 0.1},
    "stabilizationSeconds": 30,
    "keepaliveExpirySeconds": 5,
    "poolTimeoutSeconds": 30,
    "configMapName": "web-limits",
    "grpcPort": 50051,
}


def load(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((CRDS / name).read_text()))


def fetchpool_schema() -> dict[str, Any]:
    [crd] = load("fetchpool.io_fetchpools.yaml")
    [version] = crd["spec"]["versions"]
    return dict(version["schema"]["openAPIV3Schema"])


def json_schema(node: Any) -> Any:
    """OpenAPI v3.0 (structural) -> JSON Schema draft 4: drop Kubernetes extensions, map nullable."""
    if isinstance(node, dict):
        out = {k: json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
        if node.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(node, list):
        return [json_schema(v) for v in node]
    return node


def validator(schema: dict[str, Any]) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    return jsonschema.Draft4Validator(json_schema(schema))


def test_crds_are_valid_kubernetes_objects() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for name in ("fetchpool.io_fetchpools.yaml", "kopf.dev_peerings.yaml"):
        for doc in load(name):
            kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_names_match_the_operator() -> None:
    [crd] = load("fetchpool.io_fetchpools.yaml")
    assert crd["spec"]["group"] == resource.GROUP and crd["spec"]["names"]["plural"] == resource.PLURAL
    assert crd["spec"]["names"]["kind"] == resource.KIND
    [version] = crd["spec"]["versions"]
    assert version["name"] == resource.VERSION and version["subresources"] == {"status": {}}


def test_every_spec_field_is_both_in_the_schema_and_understood() -> None:
    properties = fetchpool_schema()["properties"]["spec"]["properties"]
    assert set(properties) == set(FULL_SPEC)
    spec, problems = resource.parse_spec("web", FULL_SPEC)
    assert problems == [] and spec is not None
    validator(fetchpool_schema()).validate(
        {"apiVersion": "fetchpool.io/v1alpha1", "kind": "FetchPool", "metadata": {"name": "web"}, "spec": FULL_SPEC}
    )


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"connectionBudget": -5}, "connectionBudget"),
        ({"minPerReplica": 0}, "minPerReplica"),
        ({"keepaliveShare": 1.5}, "keepaliveShare"),
        ({"mode": "magic"}, "mode"),
        ({"target": {}}, "target"),
        ({"formula": {"latencySeconds": 1, "processingTimeSeconds": 0}}, "formula"),
        ({"grpcPort": 0}, "grpcPort"),
    ],
)
def test_the_schema_refuses_what_the_operator_refuses(change: dict[str, Any], path: str) -> None:
    spec = {**copy.deepcopy(FULL_SPEC), **change}
    errors = list(validator(fetchpool_schema()).iter_errors({"spec": spec}))
    assert errors and any(path in list(e.absolute_path) for e in errors), errors
    parsed, problems = resource.parse_spec("web", spec)
    assert parsed is None and problems  # the operator refuses it too (a schema-less API let it in)


def test_the_chart_default_fetchpool_is_valid() -> None:
    """The shape the chart's templates/fetchpool.yaml renders."""
    spec = {
        "target": {"kind": "Deployment", "name": "fp", "hpaName": "fp"},
        "connectionBudget": 400,
        "minPerReplica": 4,
        "maxPerReplica": 200,
        "keepaliveShare": 0.5,
        "mode": "budget",
        "configMapName": "fp-limits",
        "grpcPort": 50051,
    }
    validator(fetchpool_schema()).validate({"spec": spec})
    assert resource.parse_spec("fp", spec)[1] == []
