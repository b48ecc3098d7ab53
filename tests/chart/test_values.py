"""Bad values fail at install time (schema or a template `fail`), with both Helms; values.yaml is
documented parameter by parameter and every parameter is in values.schema.json."""

from __future__ import annotations

import json
import re
from typing import Any

import chartlib
import pytest
import yaml


def _alert(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {"metrics": {"prometheusRule": {"alerts": {name: settings}}}}


# (id, values, a fragment of the expected message). Messages from the schema name the path;
# messages from templates/validate.yaml name the values to change.
BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("negative-max-connections", {"config": {"limits": {"maxConnections": -5}}}, "maxConnections"),
    ("zero-max-connections", {"config": {"limits": {"maxConnections": 0}}}, "maxConnections"),
    ("negative-keepalive", {"config": {"limits": {"maxKeepaliveConnections": -1}}}, "maxKeepaliveConnections"),
    ("negative-per-host", {"config": {"limits": {"maxConnectionsPerHost": -1}}}, "maxConnectionsPerHost"),
    ("zero-timeout", {"config": {"timeouts": {"connect": 0}}}, "connect"),
    ("negative-grace", {"config": {"gracePeriod": -1}}, "gracePeriod"),
    ("negative-body", {"config": {"maxBodyBytes": -1}}, "maxBodyBytes"),
    ("string-limit", {"config": {"limits": {"maxConnections": "lots"}}}, "maxConnections"),
    ("unknown-proxy-scheme", {"proxy": {"urls": ["ftp://proxy.example:21"]}}, "proxy/urls/0"),
    ("proxy-without-scheme", {"proxy": {"urls": ["proxy.example:3128"]}}, "proxy/urls/0"),
    ("proxy-with-comma", {"proxy": {"urls": ["http://a:1,http://b:2"]}}, "proxy/urls/0"),
    ("unknown-proxy-policy", {"proxy": {"policy": "random"}}, "policy"),
    (
        "hpa-and-keda",
        {
            "autoscaling": {"enabled": True},
            "keda": {"enabled": True, "prometheus": {"serverAddress": "http://p:9090"}},
            "resources": {"requests": {"cpu": "1"}},
        },
        "mutually exclusive",
    ),
    (
        "hpa-min-above-max",
        {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}, "resources": {"requests": {"cpu": "1"}}},
        "autoscaling.minReplicas (5) must not exceed autoscaling.maxReplicas (3)",
    ),
    (
        "keda-min-above-max",
        {
            "keda": {
                "enabled": True,
                "minReplicaCount": 9,
                "maxReplicaCount": 2,
                "prometheus": {"serverAddress": "http://p:9090"},
            }
        },
        "keda.minReplicaCount (9)",
    ),
    ("hpa-zero-max", {"autoscaling": {"maxReplicas": 0}}, "maxReplicas"),
    (
        "hpa-cpu-without-requests",
        {"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}},
        "resources.requests.cpu",
    ),
    (
        "hpa-without-metrics",
        {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}},
        "needs a metric",
    ),
    (
        "demand-without-metrics",
        {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None, "demand": {"enabled": True}}},
        "metrics.enabled",
    ),
    ("keda-without-prometheus", {"keda": {"enabled": True}}, "serverAddress"),
    ("negative-replicas", {"replicaCount": -1}, "replicaCount"),
    ("grace-not-above-drain", {"terminationGracePeriodSeconds": 20}, "terminationGracePeriodSeconds (20) must exceed"),
    ("pdb-both", {"pdb": {"minAvailable": 1, "maxUnavailable": 1}}, "mutually exclusive"),
    ("pdb-bad-percent", {"pdb": {"maxUnavailable": "half"}}, "maxUnavailable"),
    ("tls-without-secret", {"tls": {"enabled": True}}, "tls.existingSecret"),
    ("mtls-without-tls", {"tls": {"clientAuth": True}}, "tls.clientAuth needs tls.enabled"),
    ("auth-without-token", {"auth": {"enabled": True}}, "auth.existingSecret"),
    ("servicemonitor-without-metrics", {"metrics": {"serviceMonitor": {"enabled": True}}}, "metrics.enabled"),
    ("metrics-on-grpc-port", {"metrics": {"enabled": True, "port": 50051}}, "metrics.port"),
    ("privileged-metrics-port", {"metrics": {"port": 80}}, "metrics/port"),
    (
        "fetchpool-min-above-max",
        {"operator": {"fetchPool": {"minPerReplica": 300, "maxPerReplica": 200}}},
        "minPerReplica (300)",
    ),
    ("keepalive-share-above-one", {"operator": {"fetchPool": {"keepaliveShare": 1.5}}}, "keepaliveShare"),
    ("unknown-mode", {"operator": {"fetchPool": {"mode": "magic"}}}, "mode"),
    (
        "keepalive-above-max",
        {"config": {"limits": {"maxConnections": 10, "maxKeepaliveConnections": 20}}},
        "maxKeepaliveConnections (20)",
    ),
    ("bad-log-level", {"config": {"logLevel": "LOUD"}}, "logLevel"),
    ("bad-otel-protocol", {"otel": {"protocol": "thrift"}}, "protocol"),
    ("bad-pull-policy", {"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ("bad-digest", {"image": {"digest": "latest"}}, "digest"),
    ("bad-port", {"service": {"port": 70000}}, "port"),
    ("bad-service-type", {"service": {"type": "ExternalName"}}, "type"),
    ("unknown-top-level-key", {"replicas": 3}, "replicas"),
    ("typo-in-nested-key", {"config": {"limit": {"maxConnections": 5}}}, "limit"),
    ("bad-secret-name", {"proxy": {"existingSecret": "Not_A_Name"}}, "existingSecret"),
    (
        "cluster-wide-and-namespaces",
        {"operator": {"clusterWide": True, "watchNamespaces": ["a"]}},
        "operator.clusterWide",
    ),
    ("test-port-privileged", {"tests": {"httpPort": 80}}, "httpPort"),
    (
        "keda-without-metrics",
        {"keda": {"enabled": True, "prometheus": {"serverAddress": "http://p:9090"}}},
        "keda.prometheus.serverAddress needs metrics.enabled",
    ),
    ("bad-otel-protocol-json", {"otel": {"protocol": "http/json"}}, "protocol"),
    ("peering-as-string", {"operator": {"peering": "fetchpool"}}, "peering"),
    ("bad-peering-name", {"operator": {"peering": {"name": "Not_A_Name"}}}, "name"),
    ("operator-metrics-on-liveness-port", {"operator": {"metrics": {"port": 8080}}}, "operator.metrics.port (8080)"),
    ("operator-metrics-privileged", {"operator": {"metrics": {"port": 90}}}, "operator/metrics/port"),
    (
        "podmonitor-without-operator-metrics",
        {"operator": {"metrics": {"enabled": False, "podMonitor": {"enabled": True}}}},
        "operator.metrics.podMonitor.enabled needs",
    ),
    ("test-page-refused-by-ssrf-guard", {"tests": {"fetchUrl": ""}}, "ssrf.allowTargets"),
    ("ssrf-rule-with-comma", {"ssrf": {"allowTargets": ["10.0.0.0/8,10.1.0.0/16"]}}, "ssrf/allowTargets/0"),
    ("ssrf-rule-with-space", {"ssrf": {"denyTargets": ["bad host"]}}, "ssrf/denyTargets/0"),
    ("ssrf-service-cidr-not-a-cidr", {"ssrf": {"serviceCIDRs": ["cluster.local"]}}, "ssrf/serviceCIDRs/0"),
    ("ssrf-guard-not-bool", {"ssrf": {"enabled": "yes"}}, "ssrf/enabled"),
    ("image-repository-empty", {"image": {"repository": ""}}, "Build it with `make image`"),
    ("dashboard-without-metrics", {"metrics": {"grafanaDashboard": {"enabled": True}}}, "metrics.enabled"),
    ("rules-without-metrics", {"metrics": {"prometheusRule": {"enabled": True}}}, "metrics.enabled"),
    (
        "alert-threshold-above-one",
        _alert("poolTimeouts", {"enabled": True, "for": "5m", "severity": "warning", "threshold": 2}),
        "poolTimeouts",
    ),
    ("alert-for-not-a-duration", _alert("overBudget", {"enabled": True, "for": "soon", "severity": "critical"}), "for"),
    ("ratio-alert-no-threshold", _alert("fetchErrors", {"threshold": None}), "threshold"),
    ("unknown-alert", _alert("latency", {}), "latency"),
    (
        "runbook-url-with-fragment",
        {"metrics": {"prometheusRule": {"runbookUrl": "https://x.example/README.md#alerts"}}},
        "runbookUrl",
    ),
    ("dns-option-without-name", {"dnsConfig": {"options": [{"value": "1"}]}}, "dnsConfig"),
    # The OTel SDK's default would be localhost:4317 in the pod, where nothing listens.
    ("otel-without-endpoint", {"otel": {"enabled": True}}, "otel.enabled needs otel.endpoint, the OTLP collector's"),
    ("bad-dns-policy", {"dnsPolicy": "Custom"}, "dnsPolicy"),
]


# What an install without image values prints, from the schema (both Helms list the missing
# "property", whose name is the instruction) or, with --skip-schema-validation, templates/validate.yaml.
IMAGE_INSTRUCTIONS = (
    "image.repository is not set: no public registry hosts the fetchpool image. Build it with `make image`, "
    "push it to a registry your cluster pulls from, then set image.registry and image.repository"
)


def test_install_without_image_fails_with_instructions_helm4() -> None:
    message = chartlib.render_error({}, image=False)
    assert IMAGE_INSTRUCTIONS in message, message
    assert chartlib.render_error({"image": {"repository": "crawl/fetchpool"}}, image=False) == ""


def test_install_without_image_fails_with_instructions_helm3(helm_cli: str) -> None:
    # `helm template` validates and renders as `helm install` does, without a cluster.
    proc = chartlib.run_helm("template", "demo", str(chartlib.CHART), "--namespace", "prod", values={}, image=False)
    assert proc.returncode != 0 and IMAGE_INSTRUCTIONS in proc.stderr, proc.stderr
    # Without the schema the templates say the same.
    proc = chartlib.run_helm("template", "demo", str(chartlib.CHART), "--skip-schema-validation", values={},
                             image=False)
    assert proc.returncode != 0 and IMAGE_INSTRUCTIONS in proc.stderr, proc.stderr
    proc = chartlib.run_helm("template", "demo", str(chartlib.CHART), "--set", "image.repository=crawl/fetchpool",
                             image=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("values", "fragment"), [pytest.param(v, f, id=i) for i, v, f in BAD_VALUES])
def test_bad_values_rejected_by_helm4(values: dict[str, Any], fragment: str) -> None:
    message = chartlib.render_error(values)
    assert message, f"Helm v4 rendered {values}"
    assert fragment in message, message


@pytest.mark.parametrize(("values", "fragment"), [pytest.param(v, f, id=i) for i, v, f in BAD_VALUES])
def test_bad_values_rejected_by_helm3(helm_cli: str, values: dict[str, Any], fragment: str) -> None:
    proc = chartlib.run_helm(
        "template", chartlib.RELEASE, str(chartlib.CHART), "--namespace", chartlib.NAMESPACE, values=values
    )
    assert proc.returncode != 0, f"Helm v3 rendered {values}"
    # Helm v3 writes schema paths with dots ("proxy.urls.0: Does not match pattern").
    assert fragment.replace("/", ".") in proc.stderr, proc.stderr


GOOD_VALUES: list[tuple[str, dict[str, Any]]] = [
    ("fractional-seconds", {"config": {"limits": {"keepaliveExpiry": 2.5}, "timeouts": {"connect": 0.5}}}),
    (
        "socks-proxies",
        {"proxy": {"urls": ["socks5://u:p@10.0.0.1:1080", "socks5h://10.0.0.2:1080", "https://p.example:443"]}},
    ),
    ("percent-pdb", {"pdb": {"maxUnavailable": "25%"}}),
    (
        "scale-to-zero-keda",
        {
            "keda": {"enabled": True, "minReplicaCount": 0, "prometheus": {"serverAddress": "http://p:9090"}},
            "metrics": {"enabled": True},
        },
    ),
    ("explicit-grace", {"terminationGracePeriodSeconds": 60}),
    ("otel-endpoint-in-config-env",
     {"otel": {"enabled": True}, "config": {"extraEnv": {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:4317"}}}),
    ("otel-endpoint-in-env",
     {"otel": {"enabled": True}, "extraEnv": [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://localhost:4317"}]}),
    ("no-prestop", {"preStopDelaySeconds": 0}),
    ("hard-anti-affinity", {"podAntiAffinityPreset": "hard"}),
    ("image-digest", {"image": {"registry": "registry.example", "digest": "sha256:" + "a" * 64}}),
    ("ipv6", {"config": {"listenAddress": "[::]"}}),
    ("extra-env", {"config": {"extraEnv": {"FETCHPOOL_MAX_REDIRECTS": 5, "FETCHPOOL_FOLLOW_REDIRECTS": True}}}),
    (
        "keda-extra-triggers-only",
        {"keda": {"enabled": True, "extraTriggers": [{"type": "cpu", "metadata": {"value": "60"}}]}},
    ),
    ("standalone-operator", {"operator": {"peering": {"enabled": False}}}),
    ("named-cluster-peering", {"operator": {"clusterWide": True, "peering": {"name": "fetchpool"}}}),
    ("operator-podmonitor", {"operator": {"metrics": {"podMonitor": {"enabled": True, "namespace": "monitoring"}}}}),
    ("self-served-test-page", {"tests": {"fetchUrl": ""}, "ssrf": {"allowTargets": ["10.244.0.0/16"]}}),
    ("self-served-test-page-guard-off", {"tests": {"fetchUrl": ""}, "ssrf": {"enabled": False}}),
    ("no-helm-test-page-check-when-tests-off", {"tests": {"enabled": False, "fetchUrl": ""}}),
    (
        "ssrf-lists",
        {
            "ssrf": {
                "allowTargets": ["10.0.0.0/8", "*.corp.example"],
                "denyTargets": ["*.svc.cluster.local"],
                "serviceCIDRs": ["10.96.0.0/12", "fd00:10:96::/112"],
            }
        },
    ),
    ("otlp-http", {"otel": {"enabled": True, "protocol": "http/protobuf", "endpoint": "http://c:4318"}}),
    ("no-spread-no-dns-options", {"topologySpreadConstraints": [], "dnsConfig": None}),
    ("best-effort-on-request", {"resources": None, "operator": {"resources": None}}),
    (
        "rules-without-operator",
        {"metrics": {"enabled": True, "prometheusRule": {"enabled": True}}, "operator": {"enabled": False}},
    ),
    (
        "dashboard-in-grafana-namespace",
        {"metrics": {"enabled": True, "grafanaDashboard": {"enabled": True, "namespace": "monitoring"}}},
    ),
]


@pytest.mark.parametrize("values", [pytest.param(v, id=i) for i, v in GOOD_VALUES])
def test_good_values_render(values: dict[str, Any]) -> None:
    assert chartlib.render_error(values) == ""


def test_rendered_numbers_and_images_follow_values() -> None:
    r = chartlib.render(dict(GOOD_VALUES)["fractional-seconds"])
    env = r.configmap_env()
    assert env["FETCHPOOL_KEEPALIVE_EXPIRY"] == "2.5" and env["FETCHPOOL_CONNECT_TIMEOUT"] == "0.5"
    r = chartlib.render(dict(GOOD_VALUES)["image-digest"])
    assert r.server_container()["image"] == "registry.example/crawl/fetchpool@sha256:" + "a" * 64
    assert r.operator()["spec"]["template"]["spec"]["containers"][0]["image"] == r.server_container()["image"]
    r = chartlib.render({"image": {"tag": "1.2.3"}})
    assert r.server_container()["image"] == "registry.example.com/crawl/fetchpool:1.2.3"
    app_version = chartlib.chart_meta()["appVersion"]
    default_image = chartlib.render("default").server_container()["image"]
    assert default_image == f"registry.example.com/crawl/fetchpool:{app_version}"
    r = chartlib.render({"image": {"registry": "", "repository": "localhost/fetchpool"}})
    assert r.server_container()["image"] == f"localhost/fetchpool:{app_version}"
    r = chartlib.render(dict(GOOD_VALUES)["extra-env"])
    assert r.configmap_env()["FETCHPOOL_MAX_REDIRECTS"] == "5"
    assert r.configmap_env()["FETCHPOOL_FOLLOW_REDIRECTS"] == "true"


# --- documentation and schema coverage --------------------------------------------------------------


def _leaves(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of values.yaml; a map or list with content counts as one parameter when it is
    documented as a whole (checked by the caller)."""
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in _leaves(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix]


def _documented() -> list[str]:
    text = (chartlib.CHART / "values.yaml").read_text()
    return re.findall(r"^\s*## @param (\S+) \S", text, re.MULTILINE)


def test_every_value_is_documented() -> None:
    values = yaml.safe_load((chartlib.CHART / "values.yaml").read_text())
    documented = _documented()
    assert len(documented) == len(set(documented)), "a parameter documented twice"
    for leaf in _leaves(values):
        parts = leaf.split(".")
        covered = any(".".join(parts[:n]) in documented for n in range(1, len(parts) + 1))
        assert covered, f"{leaf} has no '## @param' line"
    for param in documented:
        node: Any = values
        for part in param.split("."):
            assert isinstance(node, dict) and part in node, f"@param {param} names no value"
            node = node[part]


def test_every_value_is_in_the_schema() -> None:
    schema = json.loads((chartlib.CHART / "values.schema.json").read_text())

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        return node

    for param in _documented():
        node = schema
        for part in param.split("."):
            node = resolve(node)
            assert part in node.get("properties", {}), f"{param} is not in values.schema.json"
            node = node["properties"][part]


def test_defaults_satisfy_the_schema_and_objects_are_closed() -> None:
    """The defaults plus an image validate; the defaults alone fail on the image only, with the
    instructions (the chart ships no pullable image)."""
    import jsonschema

    schema = json.loads((chartlib.CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((chartlib.CHART / "values.yaml").read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(defaults))
    assert errors and all(list(e.absolute_path) == ["image"] for e in errors), errors
    assert any(IMAGE_INSTRUCTIONS in e.message for e in errors)
    jsonschema.validate({**defaults, "image": {**defaults["image"], **chartlib.IMAGE}}, schema)
    assert schema["additionalProperties"] is False
    for name in ("config", "proxy", "tls", "autoscaling", "keda", "operator", "networkPolicy"):
        assert schema["properties"][name]["additionalProperties"] is False, name


def test_readme_parameters_up_to_date() -> None:
    import readme

    current = (chartlib.CHART / "README.md").read_text()
    assert readme.render_readme(current) == current, "run: python tests/chart/readme.py"


def test_otel_endpoint_examples_are_fully_qualified() -> None:
    """The pods resolve with ndots 1 (the chart README's DNS section): a cluster name written
    short costs a lookup first, so the examples write it whole."""
    texts = [chartlib.CHART / "values.yaml", chartlib.CHART / "README.md", *chartlib.CI_VALUES.values()]
    found = [(path.name, name) for path in texts for name in re.findall(r"otel-collector[\w.-]*", path.read_text())]
    assert found and [f for f in found if not f[1].endswith(".svc.cluster.local")] == [], found


def test_spreading_turns_off_with_the_readme_s_set_json(helm_cli: str) -> None:
    """The chart README's `--set-json 'topologySpreadConstraints=[]'` (`--set` cannot write [])."""
    proc = chartlib.run_helm("template", chartlib.RELEASE, str(chartlib.CHART), "--set-json",
                             "topologySpreadConstraints=[]", values={})
    assert proc.returncode == 0, proc.stderr
    [deployment] = [doc for doc in yaml.safe_load_all(proc.stdout)
                    if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"] == "demo-fetchpool"]
    assert "topologySpreadConstraints" not in deployment["spec"]["template"]["spec"]
    assert "--set-json 'topologySpreadConstraints=[]'" in (chartlib.CHART / "README.md").read_text()
