"""Assertions on the rendered objects of every CI value set (Helm v4 SDK render)."""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Any

import chartlib
import pytest
from chartlib import env_of, render

OLDEST, NEWEST = chartlib.kube_versions()
VALUE_SETS = sorted(chartlib.CI_VALUES)
GRPC_PORT = 50051

# Kinds outside the Kubernetes schemas: checked against their CRD (crds/) or by hand below.
CUSTOM_KINDS = {
    "FetchPool",
    "KopfPeering",
    "ClusterKopfPeering",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
    "ScaledObject",
}
IMMUTABLE_SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
STANDARD_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/component",
}

# The operator's RBAC, exactly: (apiGroup, resource, verb). What fetchpool.operator (k8s.py: reads,
# the limits ConfigMap, the status patch) and kopf 1.45 (watches, indexes, Events) use. No patch on
# fetchpools (the operator writes only the status: no finalizers, no annotations), no get on pods
# (listed by selector, never read one by one), nothing on CRDs or namespaces (kopf only warns).
OPERATOR_PERMISSIONS = {
    *(("fetchpool.io", "fetchpools", v) for v in ("get", "list", "watch")),
    ("fetchpool.io", "fetchpools/status", "patch"),
    *(("autoscaling", "horizontalpodautoscalers", v) for v in ("get", "list", "watch")),
    *(("apps", "deployments", v) for v in ("get", "list", "watch")),
    *(("", "pods", v) for v in ("list", "watch")),
    *(("", "configmaps", v) for v in ("get", "create", "patch")),
    ("", "events", "create"),
}
# kopf peering (kopf.dev, not the old kopf.zalando.org): namespaced with the Roles, cluster-wide with
# the ClusterRole; list/watch on the kind, get/patch on the peering object only.
PEERING_VERBS = ("get", "list", "watch", "patch")
NAMESPACED_PEERING_PERMISSIONS = {("kopf.dev", "kopfpeerings", v) for v in PEERING_VERBS}
CLUSTER_PEERING_PERMISSIONS = {("kopf.dev", "clusterkopfpeerings", v) for v in PEERING_VERBS}


def fullname(r: chartlib.Rendered) -> str:
    return r.server()["metadata"]["name"]


# --- schemas --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", [OLDEST, NEWEST])
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_manifests_validate_against_kubernetes_schemas(value_set: str, kube_version: str) -> None:
    import kubernetes_validate

    r = render(value_set)
    checked = 0
    for obj in r.objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {kube_version}: {exc}")
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("kube_version", [OLDEST, NEWEST])
def test_crds_validate_against_kubernetes_schemas(kube_version: str) -> None:
    import kubernetes_validate
    import yaml

    paths = sorted(chartlib.CRDS_DIR.glob("*.y*ml")) if chartlib.CRDS_DIR.is_dir() else []
    if not paths:
        pytest.skip("helm/fetchpool/crds/ not written yet (the operator's part)")
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kubernetes_validate.validate(doc, kube_version, strict=True)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_fetchpool_resource_matches_crd_and_operator(value_set: str) -> None:
    r = render(value_set)
    if not r.has("FetchPool"):
        assert not r.operator(), "the operator's FetchPool is rendered with the operator"
        return
    fp = r.get("FetchPool")
    assert fp["apiVersion"] == "fetchpool.io/v1alpha1"
    assert fp["spec"]["target"] == {
        "kind": "Deployment",
        "name": fullname(r),
        **({"hpaName": fp["spec"]["target"]["hpaName"]} if "hpaName" in fp["spec"]["target"] else {}),
    }
    assert fp["spec"]["configMapName"] == f"{fullname(r)}-limits"
    # The CRD's schema, when the operator engineer's crds/ exists.
    schema = chartlib.crd_schemas().get(("fetchpool.io", "v1alpha1", "FetchPool"))
    if schema:
        import jsonschema

        jsonschema.validate({k: v for k, v in fp.items() if k != "metadata"}, _openapi_to_jsonschema(schema))
    # The operator's own parser (the truth of what the spec means), when importable.
    resource = pytest.importorskip("fetchpool.operator.resource")
    parsed, problems = resource.parse_spec(fp["metadata"]["name"], fp["spec"])
    assert problems == [], problems
    assert parsed.deployment == fullname(r)
    assert parsed.config_map == f"{fullname(r)}-limits"


def _openapi_to_jsonschema(schema: Any) -> Any:
    """Drop the Kubernetes extensions (x-kubernetes-*) jsonschema does not know."""
    if isinstance(schema, dict):
        return {k: _openapi_to_jsonschema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if isinstance(schema, list):
        return [_openapi_to_jsonschema(v) for v in schema]
    return schema


# --- replicas, autoscaling ------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_no_replicas_field_when_autoscaled(value_set: str) -> None:
    r = render(value_set)
    autoscaled = r.has("HorizontalPodAutoscaler") or r.has("ScaledObject")
    spec = r.server()["spec"]
    if autoscaled:
        assert "replicas" not in spec, "the HPA owns the replica count; a replicas field fights it on every upgrade"
    else:
        assert spec["replicas"] == chartlib.load_values(value_set).get("replicaCount", 2)


def test_hpa_autoscaling_v2_with_behavior_and_absolute_demand() -> None:
    r = render("hpa")
    assert not r.has("ScaledObject")
    hpa = r.get("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": fullname(r)}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] < behavior["scaleDown"]["stabilizationWindowSeconds"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"] if m["type"] != "Resource"}
    resources = {
        m["resource"]["name"]: m["resource"]["target"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"
    }
    assert resources["cpu"] == {"type": "Utilization", "averageUtilization": 60}
    demand = metrics["Pods"]["pods"]
    assert demand["metric"]["name"] == "fetchpool_demand_requests"
    # Absolute demand per pod, never a utilization ratio (the operator moves the denominator).
    assert demand["target"] == {"type": "AverageValue", "averageValue": "40"}
    # The CPU target is a percentage of the request: the request must be there.
    assert r.server_container()["resources"]["requests"]["cpu"]


def test_default_hpa_metric_is_cpu() -> None:
    r = render({"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": "100m"}}})
    (metric,) = r.get("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_keda_scaledobject_instead_of_hpa() -> None:
    r = render("keda")
    assert not r.has("HorizontalPodAutoscaler")
    so = r.get("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["name"] == fullname(r)
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (2, 20)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA trigger metadata are strings"
    assert 'fetchpool_demand_requests{namespace="prod",service="demo-fetchpool"}' in trigger["metadata"]["query"]
    assert so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilizationWindowSeconds"
    ]
    # The operator follows KEDA's HPA.
    assert r.get("FetchPool")["spec"]["target"]["hpaName"] == f"keda-hpa-{fullname(r)}"


def test_operator_follows_the_chart_hpa() -> None:
    assert render("hpa").get("FetchPool")["spec"]["target"]["hpaName"] == "demo-fetchpool"
    assert "hpaName" not in render("default").get("FetchPool")["spec"]["target"]


# --- labels, selectors, names ---------------------------------------------------------------------


def _selectors(r: chartlib.Rendered) -> list[tuple[str, dict[str, str]]]:
    out: list[tuple[str, dict[str, str]]] = []
    for obj in r.objects:
        kind, spec = obj["kind"], obj.get("spec", {})
        name = f"{kind}/{obj['metadata']['name']}"
        if kind in ("Deployment", "PodDisruptionBudget"):
            out.append((name, spec["selector"]["matchLabels"]))
        elif kind == "Service":
            out.append((name, spec["selector"]))
        elif kind == "NetworkPolicy":
            out.append((name, spec["podSelector"]["matchLabels"]))
        elif kind == "ServiceMonitor":
            out.append((name, spec["selector"]["matchLabels"]))
    return out


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_selectors_are_immutable_labels_only(value_set: str) -> None:
    r = render(value_set)
    selectors = _selectors(r)
    assert selectors
    for name, selector in selectors:
        assert set(selector) == IMMUTABLE_SELECTOR_KEYS, f"{name}: selector {selector}"
        assert selector["app.kubernetes.io/instance"] == chartlib.RELEASE
    for dep in r.all("Deployment"):
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        for key, value in dep["spec"]["selector"]["matchLabels"].items():
            assert pod_labels[key] == value
    # The service's and the operator's pods never match each other's selectors.
    components = [d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for d in r.all("Deployment")]
    assert len(components) == len(set(components))


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_resources_named_and_labelled_consistently(value_set: str) -> None:
    r = render(value_set)
    base = fullname(r)
    suffixes = {"", "-headless", "-config", "-proxy", "-auth", "-admin", "-operator", "-test", "-dashboard"}
    values = chartlib.load_values(value_set)
    peering_name = values.get("operator", {}).get("peering", {}).get("name")
    for obj in r.objects:
        meta = obj["metadata"]
        name = meta["name"]
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            assert name == f"{chartlib.NAMESPACE}-{base}-operator"
        elif obj["kind"] in ("KopfPeering", "ClusterKopfPeering") and peering_name:
            assert name == peering_name
        elif obj["kind"] == "ClusterKopfPeering":
            assert name == f"{chartlib.NAMESPACE}-{base}-operator"
        elif obj["kind"] == "ServiceAccount" and not values.get("serviceAccount", {}).get("create", True):
            pytest.fail("no ServiceAccount when serviceAccount.create is false")
        else:
            assert any(name == base + s for s in suffixes), f"{obj['kind']}/{name} does not follow <fullname>[-part]"
        assert len(name) <= 63
        labels = meta["labels"]
        assert set(labels) >= STANDARD_LABELS, f"{obj['kind']}/{name}: {sorted(STANDARD_LABELS - set(labels))} missing"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == chartlib.chart_meta()["appVersion"]
        assert labels["helm.sh/chart"] == f"fetchpool-{chartlib.chart_meta()['version']}"
        for key, value in values.get("commonLabels", {}).items():
            assert labels[key] == value
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"):
            assert meta["namespace"] in (chartlib.NAMESPACE, *values.get("operator", {}).get("watchNamespaces", []))


def test_name_overrides_and_long_release_names() -> None:
    r = render({"fullnameOverride": "fp"})
    assert fullname(r) == "fp" and r.has("Service", "fp-headless") and r.has("ConfigMap", "fp-config")
    r = render({"nameOverride": "crawler"})
    assert fullname(r) == "demo-crawler"
    assert r.server()["metadata"]["labels"]["app.kubernetes.io/name"] == "crawler"
    long_release = "a" * 53
    r = render("default", name=long_release)
    for obj in r.objects:
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
    r = render("default", name="fetchpool")  # a release named like the chart is not doubled
    assert fullname(r) == "fetchpool"


# --- the service's pod ----------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_probes_are_grpc_health_probes(value_set: str) -> None:
    r = render(value_set)
    container = r.server_container()
    probes = {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    if chartlib.load_values(value_set).get("tls", {}).get("enabled"):
        # The kubelet's gRPC probe has no TLS: the same Health check runs in the container.
        for kind, probe in probes.items():
            command = probe["exec"]["command"]
            assert command[:2] == ["python3", "-c"] and "HealthStub" in command[2], kind
        assert probes["readinessProbe"]["exec"]["command"][3] == "fetchpool.v1.FetchService"
        assert probes["livenessProbe"]["exec"]["command"][3] == ""
        env = env_of(container)
        assert env["FP_TLS_CA"]["value"].endswith("/ca.crt") and "FP_TLS_CERT" in env
        return
    for kind, probe in probes.items():
        assert set(probe) >= {"grpc", "periodSeconds", "failureThreshold"}, kind
        assert probe["grpc"]["port"] == GRPC_PORT
        assert "httpGet" not in probe and "tcpSocket" not in probe and "exec" not in probe
    # Readiness follows the FetchService status (NOT_SERVING while draining); liveness the process.
    assert probes["readinessProbe"]["grpc"]["service"] == "fetchpool.v1.FetchService"
    assert probes["livenessProbe"]["grpc"]["service"] == ""
    assert probes["startupProbe"]["grpc"]["service"] == ""


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_termination_grace_exceeds_drain(value_set: str) -> None:
    r = render(value_set)
    pod = r.server()["spec"]["template"]["spec"]
    grace = float(r.configmap_env()["FETCHPOOL_GRACE_PERIOD"])
    pre_stop = r.server_container().get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    delay = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    assert pod["terminationGracePeriodSeconds"] > grace + delay
    assert delay > 0, "a preStop delay lets endpoint removal reach callers before the drain"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_security_contexts_hardened(value_set: str) -> None:
    r = render(value_set)
    pods = list(r.workloads())
    assert len(pods) >= 2  # the service, the helm test pod (and the operator)
    for obj, pod in pods:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert isinstance(psc["runAsUser"], int) and psc["runAsUser"] > 0, where
        assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True, where
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert sc.get("privileged") is not True, where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            # A read-only root still needs a writable /tmp.
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), where
        if obj["metadata"]["labels"]["app.kubernetes.io/component"] != "operator":
            assert pod["automountServiceAccountToken"] is False, f"{where}: no API token where the API is not used"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_container_has_requests_and_a_memory_limit(value_set: str) -> None:
    """No BestEffort pod (the first evicted, and refused where a ResourceQuota asks for requests):
    the service, the operator and the helm test pod request CPU and memory and cap memory. No CPU
    limit by default: throttling would stall every fetch of the pod's event loop."""
    r = render(value_set)
    pods = list(r.workloads())
    assert len(pods) >= 2
    for obj, pod in pods:
        for c in pod["containers"]:
            where = f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            resources = c["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], where
            assert resources["limits"]["memory"], where
            assert "cpu" not in resources["limits"], where
    overrides = chartlib.load_values(value_set).get("resources")
    if overrides:  # merged over the defaults, key by key (Helm's values merge)
        for kind, amounts in overrides.items():
            for name, amount in amounts.items():
                assert r.server_container()["resources"][kind][name] == amount


def test_resources_defaults_and_opt_out() -> None:
    r = render("default")
    assert r.server_container()["resources"] == {
        "requests": {"cpu": "500m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }
    (operator,) = r.operator()["spec"]["template"]["spec"]["containers"]
    assert operator["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}
    # The HPA's CPU target works on a first install: the request it is a percentage of is there.
    assert chartlib.render_error({"autoscaling": {"enabled": True}}) == ""
    # null removes a default (Helm's merge): BestEffort only when asked for.
    bare = render({"resources": None, "operator": {"resources": None}, "tests": {"resources": None}})
    assert all("resources" not in c for _, pod in bare.workloads() for c in pod["containers"])


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_pods_spread_over_zones_and_nodes(value_set: str) -> None:
    r = render(value_set)
    pod = r.server()["spec"]["template"]["spec"]
    selector = r.server()["spec"]["selector"]["matchLabels"]
    constraints = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    expected = {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    if "topologySpreadConstraints" in chartlib.load_values(value_set):
        expected = {c["topologyKey"] for c in chartlib.load_values(value_set)["topologySpreadConstraints"]}
    assert set(constraints) == expected
    for key, c in constraints.items():
        assert c["labelSelector"] == {"matchLabels": selector}, key
        assert c["maxSkew"] == 1 and c["whenUnsatisfiable"] == "ScheduleAnyway", key
    if value_set == "default":
        # Each rollout's ReplicaSet is spread on its own (old pods leaving do not skew the new ones).
        assert all(c["matchLabelKeys"] == ["pod-template-hash"] for c in constraints.values())
    unspread = render({"topologySpreadConstraints": []}).server()["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in unspread


def test_notes_say_what_a_first_install_gives_and_what_to_set_next() -> None:
    notes = render("default").notes
    assert "image registry.example.com/crawl/fetchpool:0.1.0" in notes
    assert 'Pods: requests {"cpu":"500m","memory":"256Mi"}, limits {"memory":"1Gi"}' in notes
    assert "spread over topology.kubernetes.io/zone and kubernetes.io/hostname; DNS ndots 1" in notes
    nexts = notes.split("What to set next", 1)[1]
    for value in ("proxy.existingSecret", "operator.fetchPool.connectionBudget (now 400)", "autoscaling.enabled",
                  "metrics.grafanaDashboard.enabled", "metrics.prometheusRule.enabled", "otel.enabled", "auth.enabled"):
        assert value in nexts, value
    # What is set is not suggested again.
    done = render("hpa").notes.split("What to set next", 1)[1]
    for value in ("autoscaling.enabled", "metrics.prometheusRule.enabled", "otel.enabled"):
        assert value not in done, value
    bare = render({"resources": None, "dnsConfig": None, "topologySpreadConstraints": []}).notes
    assert "no requests (BestEffort" in bare and "no topology spread; the cluster's DNS options" in bare


def test_notes_try_it_line_sends_the_token_when_auth_is_on() -> None:
    """With auth on, the port-forward's fetch gets the token of the Secret the pods read."""
    open_line = "fetchpool fetch https://example.com/ --target 127.0.0.1:50051\n"
    assert open_line in render("default").notes and "--token-file" not in render("default").notes
    notes = render({"auth": {"enabled": True, "existingSecret": "fp-auth", "existingSecretKey": "api.token"}}).notes
    assert ("kubectl -n prod get secret fp-auth -o jsonpath='{.data.api\\.token}' | base64 -d > fetchpool.token\n"
            in notes), notes
    assert "fetchpool fetch https://example.com/ --target 127.0.0.1:50051 --token-file fetchpool.token\n" in notes
    assert open_line not in notes
    generated = render({"auth": {"enabled": True, "token": "s3cret"}}).notes
    assert "get secret demo-fetchpool-auth -o jsonpath='{.data.token}'" in generated, generated


def test_dns_lookups_of_external_names_not_multiplied() -> None:
    """Kubernetes' ndots:5 sends `www.example.com` through every search domain first (3 or more
    NXDOMAIN round trips, twice for A and AAAA); ndots:1 asks for it as it is first."""
    pod = render("default").server()["spec"]["template"]["spec"]
    assert pod["dnsPolicy"] == "ClusterFirst"
    assert pod["dnsConfig"] == {"options": [{"name": "ndots", "value": "1"}]}
    assert "dnsConfig" not in render({"dnsConfig": None}).server()["spec"]["template"]["spec"]
    custom = render({"dnsConfig": {"options": [{"name": "ndots", "value": "2"}, {"name": "timeout", "value": "2"}]}})
    assert custom.server()["spec"]["template"]["spec"]["dnsConfig"]["options"][1] == {"name": "timeout", "value": "2"}


def test_service_env_contract_and_numbers() -> None:
    """ConfigMap keys are the service's variables, with values it can parse (no 1.048576e+07)."""
    r = render("default")
    env = r.configmap_env()
    assert env["FETCHPOOL_LISTEN"] == "0.0.0.0:50051"
    assert env["FETCHPOOL_MAX_BODY_BYTES"] == "10485760"
    assert env["FETCHPOOL_MAX_BATCH_SIZE"] == "100000"
    assert float(env["FETCHPOOL_GRPC_MAX_CONNECTION_AGE"]) > 0, "callers must re-resolve after scale-up"
    assert env["FETCHPOOL_LIMITS_FILE"] == "/etc/fetchpool/limits/limits.json"
    for key, value in env.items():
        assert re.fullmatch(r"(FETCHPOOL|OTEL)_[A-Z0-9_]+", key), key
        assert "e+" not in value, f"{key}={value}"
    config = pytest.importorskip("fetchpool.config")
    by_env = {o.env: o for o in config.OPTIONS}
    for key, value in env.items():
        if key in by_env:
            by_env[key].parse(value)  # raises on a value the service cannot read
    # Settings the service reads from the environment exactly as the chart renders them.
    import argparse

    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    settings = config.settings_from_args(parser.parse_args([]), env)
    # The operator divides a budget: a pod starts with the start limit, minPerReplica, until the
    # operator has confirmed it (also before its first limits ConfigMap exists).
    assert (settings.limits.max_connections, settings.limits.max_keepalive_connections) == (10, 10)
    assert settings.server.admin_token_file == "/etc/fetchpool/admin/token"
    alone = config.settings_from_args(parser.parse_args([]), render("operator-off").configmap_env())
    assert alone.limits.max_connections == 100  # no operator: config.limits as given


def test_limits_configmap_mounted_optionally() -> None:
    r = render("default")
    pod = r.server()["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "limits"]
    assert vol["configMap"] == {"name": "demo-fetchpool-limits", "optional": True}
    (mount,) = [m for m in r.server_container()["volumeMounts"] if m["name"] == "limits"]
    assert r.configmap_env()["FETCHPOOL_LIMITS_FILE"].startswith(mount["mountPath"] + "/")
    assert "subPath" not in mount  # a subPath mount would never see the operator's updates
    assert not r.has("ConfigMap", "demo-fetchpool-limits"), "the operator owns the limits ConfigMap"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_otel_env_and_downward_api(value_set: str) -> None:
    r = render(value_set)
    env = env_of(r.server_container())
    names = [e["name"] for e in r.server_container()["env"]]
    for var, field in (
        ("K8S_POD_NAME", "metadata.name"),
        ("K8S_NAMESPACE_NAME", "metadata.namespace"),
        ("K8S_NODE_NAME", "spec.nodeName"),
    ):
        assert env[var]["valueFrom"]["fieldRef"]["fieldPath"] == field
    attrs = dict(kv.split("=", 1) for kv in env["OTEL_RESOURCE_ATTRIBUTES"]["value"].split(","))
    assert attrs["k8s.pod.name"] == "$(K8S_POD_NAME)"
    assert attrs["k8s.namespace.name"] == "$(K8S_NAMESPACE_NAME)"
    assert attrs["k8s.node.name"] == "$(K8S_NODE_NAME)"
    # $(VAR) expands only from variables defined earlier in the list.
    for ref in re.findall(r"\$\((\w+)\)", env["OTEL_RESOURCE_ATTRIBUTES"]["value"]):
        assert names.index(ref) < names.index("OTEL_RESOURCE_ATTRIBUTES")
    cm = r.configmap_env()
    values = chartlib.load_values(value_set)
    otel = values.get("otel", {})
    # Never OTEL_SDK_DISABLED (a no-op SDK under the Prometheus endpoint too): per-signal exporters.
    assert "OTEL_SDK_DISABLED" not in cm and "OTEL_SDK_DISABLED" not in env
    exporter = "otlp" if otel.get("enabled") else "none"
    assert (cm["OTEL_TRACES_EXPORTER"], cm["OTEL_METRICS_EXPORTER"]) == (exporter, exporter)
    assert cm["OTEL_SERVICE_NAME"] == fullname(r)
    if otel.get("endpoint"):
        assert cm["OTEL_EXPORTER_OTLP_ENDPOINT"] == otel["endpoint"]
        assert attrs["deployment.environment.name"] == "staging"
    if not otel.get("enabled"):
        assert not [k for k in cm if k.startswith(("OTEL_EXPORTER_", "OTEL_TRACES_SAMPLER"))]
    if otel.get("headers", {}).get("existingSecret"):
        assert env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"]["name"] == "otlp-headers"


# --- secrets --------------------------------------------------------------------------------------

SENTINEL_PASSWORD = "Sentinel-Pr0xy-Passw0rd"
SENTINEL_TOKEN = "Sentinel-Bearer-T0ken"


def _walk_strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _walk_strings(v)] + [str(k) for k in node]
    if isinstance(node, list):
        return [s for v in node for s in _walk_strings(v)]
    return [str(node)]


def test_secrets_never_rendered_into_configmaps_or_env_values() -> None:
    r = render(
        {
            "proxy": {"urls": [f"http://user:{SENTINEL_PASSWORD}@203.0.113.7:3128", "socks5://203.0.113.8:1080"]},
            "auth": {"enabled": True, "token": SENTINEL_TOKEN},
        }
    )
    for obj in r.objects:
        text = " ".join(_walk_strings(obj))
        if obj["kind"] == "Secret":
            continue
        assert SENTINEL_PASSWORD not in text, f"proxy password in {obj['kind']}/{obj['metadata']['name']}"
        assert SENTINEL_TOKEN not in text, f"auth token in {obj['kind']}/{obj['metadata']['name']}"
        assert base64.b64encode(SENTINEL_PASSWORD.encode()).decode()[:12] not in text
    proxy = r.get("Secret", "demo-fetchpool-proxy")
    assert base64.b64decode(proxy["data"]["proxy-urls"]).decode().count(SENTINEL_PASSWORD) == 1
    assert base64.b64decode(r.get("Secret", "demo-fetchpool-auth")["data"]["token"]).decode() == SENTINEL_TOKEN
    env = env_of(r.server_container())
    assert env["FETCHPOOL_PROXY"]["valueFrom"]["secretKeyRef"] == {"name": "demo-fetchpool-proxy", "key": "proxy-urls"}
    assert "FETCHPOOL_PROXY" not in r.configmap_env()
    # A new proxy list rolls the pods (the checksum of the Secret changes).
    other = render({"proxy": {"urls": ["http://203.0.113.9:3128"]}})
    key = "checksum/secret"
    assert (
        r.server()["spec"]["template"]["metadata"]["annotations"][key]
        != other.server()["spec"]["template"]["metadata"]["annotations"][key]
    )


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_no_credentials_in_plain_values(value_set: str) -> None:
    """No ConfigMap value or env `value` carries URL credentials or a key/token."""
    r = render(value_set)
    for obj in r.objects:
        if obj["kind"] == "ConfigMap":
            for key, value in obj["data"].items():
                assert not re.search(r"://[^/\s]*:[^/\s]*@", value), f"{key} has credentials"
    for _obj, pod in r.workloads():
        for c in pod["containers"]:
            for e in c.get("env", []):
                assert not re.search(r"://[^/\s]*:[^/\s]*@", str(e.get("value", ""))), e["name"]
                if re.search(r"PROXY|TOKEN|PASSWORD|HEADERS|SECRET", e["name"]) and not e["name"].endswith(
                    ("_FILE", "_POLICY")
                ):
                    assert "valueFrom" in e, f"{e['name']} must come from a Secret"


def test_existing_secrets_are_referenced_not_rendered() -> None:
    r = render("tls")
    assert not r.all("Secret")
    admin = {v["name"]: v for v in r.server()["spec"]["template"]["spec"]["volumes"]}["admin-token"]
    assert admin["secret"] == {"secretName": "fetchpool-admin", "items": [{"key": "admin-token", "path": "token"}]}
    operator_volumes = {v["name"]: v for v in r.operator()["spec"]["template"]["spec"]["volumes"]}
    assert operator_volumes["admin-token"] == admin
    env = env_of(r.server_container())
    assert env["FETCHPOOL_PROXY"]["valueFrom"]["secretKeyRef"] == {"name": "fetchpool-proxies", "key": "urls"}
    pod = r.server()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "fetchpool-tls"
    assert volumes["client-tls"]["secret"]["secretName"] == "fetchpool-client-tls"
    assert volumes["auth"]["secret"]["secretName"] == "fetchpool-auth"
    assert volumes["ca-bundle"]["configMap"]["name"] == "corp-ca"
    cm = r.configmap_env()
    assert cm["FETCHPOOL_TLS_CERT"] == "/etc/fetchpool/tls/tls.crt"
    assert cm["FETCHPOOL_TLS_KEY"] == "/etc/fetchpool/tls/tls.key"
    assert cm["FETCHPOOL_TLS_CLIENT_CA"] == "/etc/fetchpool/tls/ca.crt"
    assert cm["FETCHPOOL_AUTH_TOKEN_FILE"] == "/etc/fetchpool/auth/token"
    assert cm["FETCHPOOL_CA_BUNDLE"] == "/etc/fetchpool/ca/ca.crt"
    assert r.get("PodDisruptionBudget")["spec"] == {
        "minAvailable": "50%",
        "selector": r.get("PodDisruptionBudget")["spec"]["selector"],
    }


# --- services, PDB, service accounts -------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_clusterip_and_headless_services(value_set: str) -> None:
    r = render(value_set)
    base = fullname(r)
    svc = r.get("Service", base)
    headless = r.get("Service", f"{base}-headless")
    assert svc["spec"]["type"] == "ClusterIP" and "clusterIP" not in svc["spec"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False  # DNS lists ready pods only
    container_ports = {p["name"]: p["containerPort"] for p in r.server_container()["ports"]}
    for s in (svc, headless):
        grpc = next(p for p in s["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["targetPort"] == "grpc" and container_ports["grpc"] == GRPC_PORT
        assert grpc["appProtocol"] == "grpc"
        assert s["spec"]["selector"] == r.server()["spec"]["selector"]["matchLabels"]
    # Callers are told how to balance calls.
    assert f"dns:///{base}-headless.prod.svc.cluster.local:50051" in r.notes
    assert "round_robin" in r.notes


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_pdb_and_service_accounts(value_set: str) -> None:
    r = render(value_set)
    values = chartlib.load_values(value_set)
    if values.get("pdb", {}).get("enabled", True):
        pdb = r.get("PodDisruptionBudget")
        assert pdb["apiVersion"] == "policy/v1"
        assert pdb["spec"]["selector"]["matchLabels"] == r.server()["spec"]["selector"]["matchLabels"]
        assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])
    else:
        assert not r.has("PodDisruptionBudget")
    pod = r.server()["spec"]["template"]["spec"]
    sa_values = values.get("serviceAccount", {})
    if sa_values.get("create", True):
        sa = r.get("ServiceAccount", pod["serviceAccountName"])
        assert sa["automountServiceAccountToken"] is False
    else:
        assert pod["serviceAccountName"] == sa_values["name"]
        assert not [s for s in r.all("ServiceAccount") if s["metadata"]["name"] == pod["serviceAccountName"]]


def test_servicemonitor_scrapes_the_metrics_port() -> None:
    r = render("hpa")
    sm = r.get("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    svc = r.get("Service", "demo-fetchpool")
    assert {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP", "appProtocol": "http"} in svc[
        "spec"
    ]["ports"]
    assert r.configmap_env()["FETCHPOOL_METRICS_PORT"] == "9464"
    # Only the main Service matches (the headless Service carries the excluded label).
    assert sm["spec"]["selector"]["matchExpressions"] == [{"key": "fetchpool.io/headless", "operator": "DoesNotExist"}]
    assert r.get("Service", "demo-fetchpool-headless")["metadata"]["labels"]["fetchpool.io/headless"] == "true"
    assert not render("default").has("ServiceMonitor")
    assert render("default").configmap_env()["FETCHPOOL_METRICS_PORT"] == "0"


# --- telemetry: OTLP export vs the Prometheus endpoint ---------------------------------------------

TELEMETRY_CASES = [
    # (otel.enabled, metrics.enabled, trace exporters, pushed metric exporters, Prometheus port)
    (False, False, (), (), 0),
    (False, True, (), (), 9464),
    (True, False, ("otlp",), ("otlp",), 0),
    (True, True, ("otlp",), ("otlp",), 9464),
]


@pytest.mark.parametrize(("otel", "metrics", "traces", "pushed", "port"), TELEMETRY_CASES)
def test_telemetry_env_as_the_service_reads_it(
    otel: bool, metrics: bool, traces: tuple[str, ...], pushed: tuple[str, ...], port: int
) -> None:
    """Metrics on with OTLP off must keep the Prometheus endpoint alive: exporters `none`, never
    OTEL_SDK_DISABLED (which makes the SDK's meters no-ops)."""
    values = {
        "otel": {"enabled": otel, "endpoint": "http://otel-collector.observability:4317"},
        "metrics": {"enabled": metrics},
    }
    r = render(values)
    cm = r.configmap_env()
    assert "OTEL_SDK_DISABLED" not in cm
    assert cm["OTEL_TRACES_EXPORTER"] == cm["OTEL_METRICS_EXPORTER"] == ("otlp" if otel else "none")
    assert cm["FETCHPOOL_METRICS_PORT"] == str(port)
    assert ("OTEL_EXPORTER_OTLP_ENDPOINT" in cm) == otel
    ports = {p["name"]: p["containerPort"] for p in r.server_container()["ports"]}
    assert ports.get("metrics") == (port or None)
    # What the service makes of it (fetchpool.telemetry.config, when importable).
    config = pytest.importorskip("fetchpool.telemetry.config")
    env = {**cm, **{e["name"]: e["value"] for e in r.server_container()["env"] if "value" in e}}
    parsed = config.TelemetryConfig.from_env(env, listen_host="0.0.0.0")
    assert (parsed.trace_exporters, parsed.metric_exporters, parsed.prometheus_port) == (traces, pushed, port)
    assert parsed.enabled == (otel or metrics)


def test_otlp_headers_only_with_otlp() -> None:
    r = render({"otel": {"headers": {"existingSecret": "otlp-headers"}}})
    assert "OTEL_EXPORTER_OTLP_HEADERS" not in env_of(r.server_container())


def test_demand_metric_port_and_name_are_consistent() -> None:
    """ServiceMonitor, HPA Pods metric and KEDA trigger all reach the pods' metrics port and the
    service's demand metric, `fetchpool_demand_requests`."""
    demand = "fetchpool_demand_requests"
    names = pytest.importorskip("fetchpool.telemetry.names")
    assert names.DEMAND.prometheus == demand, "the service renamed its demand metric"
    for value_set in ("hpa", "keda"):
        r = render(value_set)
        cm = r.configmap_env()
        container_ports = {p["name"]: p["containerPort"] for p in r.server_container()["ports"]}
        assert container_ports["metrics"] == int(cm["FETCHPOOL_METRICS_PORT"]) == 9464
        svc_port = next(p for p in r.get("Service", fullname(r))["spec"]["ports"] if p["name"] == "metrics")
        assert svc_port["targetPort"] == "metrics" and svc_port["port"] == 9464
        if r.has("ServiceMonitor"):
            (endpoint,) = r.get("ServiceMonitor")["spec"]["endpoints"]
            assert endpoint["port"] == svc_port["name"]
        if r.has("HorizontalPodAutoscaler"):
            pods = [m for m in r.get("HorizontalPodAutoscaler")["spec"]["metrics"] if m["type"] == "Pods"]
            assert [m["pods"]["metric"]["name"] for m in pods] == [demand]
        if r.has("ScaledObject"):
            (trigger,) = r.get("ScaledObject")["spec"]["triggers"]
            # `service` is the label prometheus-operator gives targets of the Service <fullname>.
            assert f'{demand}{{namespace="prod",service="{fullname(r)}"}}' in trigger["metadata"]["query"]
    import yaml

    defaults = yaml.safe_load((chartlib.CHART / "values.yaml").read_text())
    assert defaults["autoscaling"]["demand"]["metricName"] == demand
    assert demand in defaults["keda"]["prometheus"]["query"]


def test_config_extra_env_overrides_chart_keys() -> None:
    r = render({"config": {"extraEnv": {"OTEL_TRACES_EXPORTER": "console", "FETCHPOOL_MAX_REDIRECTS": 3}}})
    cm = r.configmap_env()
    assert cm["OTEL_TRACES_EXPORTER"] == "console" and cm["FETCHPOOL_MAX_REDIRECTS"] == "3"
    assert r.files["fetchpool/templates/configmap.yaml"].count("OTEL_TRACES_EXPORTER:") == 1


# --- SSRF guard ----------------------------------------------------------------------------------


def test_ssrf_guard_on_by_default_without_lists() -> None:
    cm = render("default").configmap_env()
    assert cm["FETCHPOOL_SSRF_GUARD"] == "true"
    assert "FETCHPOOL_ALLOW_TARGETS" not in cm and "FETCHPOOL_DENY_TARGETS" not in cm


def test_ssrf_lists_rendered_and_read_by_the_service() -> None:
    values = {
        "ssrf": {
            "allowTargets": ["10.0.0.0/8", "*.corp.example"],
            "denyTargets": ["*.svc.cluster.local"],
            "serviceCIDRs": ["10.96.0.0/12", "fd00:10:96::/112"],
        }
    }
    r = render(values)
    cm = r.configmap_env()
    assert cm["FETCHPOOL_ALLOW_TARGETS"] == "10.0.0.0/8,*.corp.example"
    # The cluster's Service CIDRs join the deny list.
    assert cm["FETCHPOOL_DENY_TARGETS"] == "*.svc.cluster.local,10.96.0.0/12,fd00:10:96::/112"
    assert "FETCHPOOL_ALLOW_TARGETS" not in env_of(r.server_container())  # envFrom, one source
    config = pytest.importorskip("fetchpool.config")
    by_env = {o.env: o for o in config.OPTIONS}
    allow = by_env["FETCHPOOL_ALLOW_TARGETS"].parse(cm["FETCHPOOL_ALLOW_TARGETS"])
    deny = by_env["FETCHPOOL_DENY_TARGETS"].parse(cm["FETCHPOOL_DENY_TARGETS"])
    assert by_env["FETCHPOOL_SSRF_GUARD"].parse(cm["FETCHPOOL_SSRF_GUARD"]) is True
    guard = pytest.importorskip("fetchpool.engine.guard").TargetGuard(True, allow, deny)
    assert guard.address_allowed("10.20.30.40")  # allowed private range
    assert not guard.address_allowed("10.96.0.1"), "a ClusterIP inside the allowed range stays denied"
    assert not guard.address_allowed("10.1.2.3", "api.ns.svc.cluster.local")
    assert not guard.address_allowed("169.254.169.254")  # not allowed, not global
    assert guard.address_allowed("93.184.215.14")


def test_ssrf_guard_can_be_turned_off_but_deny_still_renders() -> None:
    cm = render({"ssrf": {"enabled": False, "serviceCIDRs": ["10.96.0.0/12"]}}).configmap_env()
    assert cm["FETCHPOOL_SSRF_GUARD"] == "false" and cm["FETCHPOOL_DENY_TARGETS"] == "10.96.0.0/12"


# --- operator and RBAC ----------------------------------------------------------------------------


def _permissions(r: chartlib.Rendered) -> set[tuple[str, str, str]]:
    granted = set()
    for role in r.all("Role") + r.all("ClusterRole"):
        for rule in role["rules"]:
            assert "resourceNames" not in rule or rule["resourceNames"]
            assert "nonResourceURLs" not in rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        granted.add((group, resource, verb))
    return granted


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_operator_rbac_is_exactly_least_privilege(value_set: str) -> None:
    r = render(value_set)
    values = chartlib.load_values(value_set)
    granted = _permissions(r)
    if not values.get("operator", {}).get("enabled", True):
        assert granted == set() and not r.operator() and not r.has("FetchPool")
        assert not r.all("RoleBinding") and not r.all("ClusterRoleBinding")
        return
    assert not any("*" in p for perm in granted for p in perm), "no wildcards"
    assert not any(resource in ("secrets", "*") for _, resource, _ in granted), "no access to Secrets"
    op_values = values.get("operator", {})
    peering = CLUSTER_PEERING_PERMISSIONS if op_values.get("clusterWide") else NAMESPACED_PEERING_PERMISSIONS
    expected = OPERATOR_PERMISSIONS | (peering if op_values.get("peering", {}).get("enabled", True) else set())
    assert granted == expected, f"extra: {sorted(granted - expected)}, missing: {sorted(expected - granted)}"
    assert not any(group == "kopf.zalando.org" for group, _, _ in granted), "kopf 1.45 peers in kopf.dev"
    # Peering objects: list/watch on the kind; get/patch only on the object this operator peers on.
    peering_name = r.operator()["spec"]["template"]["spec"]["containers"][0]["args"]
    peering_name = next((a.split("=", 1)[1] for a in peering_name if a.startswith("--peering=")), None)
    for role in r.all("Role") + r.all("ClusterRole"):
        for rule in role["rules"]:
            if rule["apiGroups"] == ["kopf.dev"] and set(rule["verbs"]) & {"get", "patch"}:
                assert rule["resourceNames"] == [peering_name], rule
            elif rule["apiGroups"] == ["kopf.dev"]:
                assert sorted(rule["verbs"]) == ["list", "watch"] and "resourceNames" not in rule, rule
    operator = r.operator()
    sa = operator["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = r.all("RoleBinding") + r.all("ClusterRoleBinding")
    assert bindings
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": chartlib.NAMESPACE}]
        kind = "Role" if binding["kind"] == "RoleBinding" else "ClusterRole"
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": kind,
            "name": binding["metadata"]["name"],
        }
    namespaces = op_values.get("watchNamespaces") or [chartlib.NAMESPACE]
    if op_values.get("clusterWide"):
        assert not r.all("Role") and len(r.all("ClusterRole")) == 1
    else:
        assert sorted(role["metadata"]["namespace"] for role in r.all("Role")) == sorted(namespaces)
        assert not r.all("ClusterRole")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_operator_deployment(value_set: str) -> None:
    r = render(value_set)
    operator = r.operator()
    if operator is None:
        return
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    assert container["image"] == r.server_container()["image"], "the operator is the same image"
    args = container["args"]
    assert args[0] == "operator"
    assert "--liveness=http://0.0.0.0:8080/healthz" in args
    values = chartlib.load_values(value_set).get("operator", {})
    if values.get("clusterWide"):
        assert "--all-namespaces" in args
    else:
        expected = values.get("watchNamespaces") or [chartlib.NAMESPACE]
        assert [a.split("=", 1)[1] for a in args if a.startswith("--namespace=")] == expected
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {"name": "healthz", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    # Peering is explicit: --peering NAME on the object the chart creates, or --standalone; never
    # kopf's auto-detection.
    peering = [a for a in args if a.startswith("--peering") or a == "--standalone"]
    if values.get("peering", {}).get("enabled", True):
        (arg,) = peering
        assert arg.startswith("--peering=")
        name = arg.split("=", 1)[1]
        kind = "ClusterKopfPeering" if values.get("clusterWide") else "KopfPeering"
        assert {o["metadata"]["name"] for o in r.all(kind)} == {name}
    else:
        assert peering == ["--standalone"]
    # kopf names this peer after the pod.
    assert env_of(container)["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The operator's Prometheus endpoint (--metrics) on the container port `metrics`.
    assert "--metrics=http://0.0.0.0:9090/metrics" in args
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]


def _peering_objects(r: chartlib.Rendered) -> list[dict[str, Any]]:
    return r.all("KopfPeering") + r.all("ClusterKopfPeering")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_peering_object_created_for_the_operator(value_set: str) -> None:
    """kopf never creates the peering object, and a `--peering NAME` operator stays paused without
    it: the chart creates NAME where kopf looks (cluster-wide, or in every watched namespace)."""
    r = render(value_set)
    objects = _peering_objects(r)
    operator = r.operator()
    if operator is None:
        assert not objects
        return
    op_values = chartlib.load_values(value_set).get("operator", {})
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    (name,) = [a.split("=", 1)[1] for a in args if a.startswith("--peering=")]
    schemas = chartlib.crd_schemas()
    for obj in objects:
        assert obj["apiVersion"] == "kopf.dev/v1"
        assert obj["metadata"]["name"] == name
        assert "status" not in obj and "spec" not in obj, "kopf owns the status"
        schema = schemas.get(("kopf.dev", "v1", obj["kind"]))
        assert schema, f"{obj['kind']} has no CRD in crds/"
        import jsonschema

        jsonschema.validate({k: v for k, v in obj.items() if k != "metadata"}, _openapi_to_jsonschema(schema))
    if op_values.get("clusterWide"):
        assert [o["kind"] for o in objects] == ["ClusterKopfPeering"] and "namespace" not in objects[0]["metadata"]
    else:
        namespaces = op_values.get("watchNamespaces") or [chartlib.NAMESPACE]
        assert {o["kind"] for o in objects} == {"KopfPeering"}
        assert sorted(o["metadata"]["namespace"] for o in objects) == sorted(namespaces)


def test_peering_names_are_per_release() -> None:
    assert render("default").get("KopfPeering")["metadata"]["name"] == "demo-fetchpool-operator"
    assert render("default", name="other").get("KopfPeering")["metadata"]["name"] == "other-fetchpool-operator"
    cluster = render({"operator": {"clusterWide": True}})
    assert cluster.get("ClusterKopfPeering")["metadata"]["name"] == "prod-demo-fetchpool-operator"
    named = render({"operator": {"peering": {"name": "crawl"}}})
    assert named.get("KopfPeering")["metadata"]["name"] == "crawl"
    assert "--peering=crawl" in named.operator()["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("cluster_wide", [False, True])
def test_standalone_operator_has_no_peering(cluster_wide: bool) -> None:
    r = render({"operator": {"clusterWide": cluster_wide, "peering": {"enabled": False}}})
    args = r.operator()["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--standalone" in args and not [a for a in args if a.startswith("--peering")]
    assert not _peering_objects(r)
    assert _permissions(r) == OPERATOR_PERMISSIONS
    # Still a single replica that never overlaps itself.
    assert r.operator()["spec"]["replicas"] == 1 and r.operator()["spec"]["strategy"] == {"type": "Recreate"}


def test_operator_rbac_without_rbac_create_keeps_peering_object() -> None:
    r = render({"operator": {"rbac": {"create": False}}})
    assert _permissions(r) == set() and r.has("KopfPeering")


def test_operator_metrics_endpoint_and_podmonitor() -> None:
    r = render("keda")
    (container,) = r.operator()["spec"]["template"]["spec"]["containers"]
    assert "--metrics=http://0.0.0.0:9090/metrics" in container["args"]
    pm = r.get("PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["metadata"]["name"] == "demo-fetchpool-operator"
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pm["spec"]["selector"]["matchLabels"] == r.operator()["spec"]["selector"]["matchLabels"]
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["prod"]}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # The FetchPool's namespace label survives (the dashboard and the alerts select by it).
    assert endpoint["honorLabels"] is True
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    # The operator's own parser reads the URL the chart passes.
    operator = pytest.importorskip("fetchpool.operator")
    assert operator.build_parser().parse_args(container["args"][1:]).metrics == "http://0.0.0.0:9090/metrics"
    # Off by default (the endpoint itself is on); off entirely without a port or flag.
    assert not render("default").has("PodMonitor")
    off = render({"operator": {"metrics": {"enabled": False}}}).operator()["spec"]["template"]["spec"]["containers"][0]
    assert not [a for a in off["args"] if a.startswith("--metrics")]
    assert [p["name"] for p in off["ports"]] == ["healthz"]
    custom = render({"operator": {"metrics": {"port": 9300, "path": "/m"}}})
    assert "--metrics=http://0.0.0.0:9300/m" in custom.operator()["spec"]["template"]["spec"]["containers"][0]["args"]


# --- NetworkPolicy --------------------------------------------------------------------------------


def test_networkpolicy_service_and_operator() -> None:
    r = render("networkpolicy")
    base = fullname(r)
    server_np = r.get("NetworkPolicy", base)
    assert server_np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    grpc_rule = next(rule for rule in server_np["spec"]["ingress"] if rule["ports"][0]["port"] == GRPC_PORT)
    peers = grpc_rule["from"]
    assert peers[0] == {
        "podSelector": {"matchLabels": {"fetchpool.io/client": "true"}},
        "namespaceSelector": {"matchLabels": {"fetchpool.io/callers": "true"}},
    }
    # The operator reaches every pod's PoolAdmin.
    assert {"podSelector": {"matchLabels": r.operator()["spec"]["selector"]["matchLabels"]}} in peers
    egress = server_np["spec"]["egress"]
    assert {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]} in egress
    assert {"to": [{"ipBlock": {"cidr": "203.0.113.7/32"}}], "ports": [{"port": 3128, "protocol": "TCP"}]} in egress
    assert not any(p.get("ipBlock", {}).get("cidr") == "0.0.0.0/0" for rule in egress for p in rule.get("to", [])), (
        "targets.enabled=false: no direct egress"
    )
    # The helm test pod is a labelled caller; it fetches a public URL, so no egress to the pod.
    test_pod = r.get("Pod")
    assert test_pod["metadata"]["labels"]["fetchpool.io/client"] == "true"
    assert not any(rule.get("ports") == [{"port": 8080, "protocol": "TCP"}] for rule in egress)

    op_np = r.get("NetworkPolicy", f"{base}-operator")
    # Liveness (the kubelet) and the metrics port (any scraper: metricsFrom is empty).
    assert op_np["spec"]["ingress"] == [
        {"ports": [{"port": 8080, "protocol": "TCP"}]},
        {"ports": [{"port": 9090, "protocol": "TCP"}]},
    ]
    to_pods = next(
        rule for rule in op_np["spec"]["egress"] if rule.get("ports") == [{"port": GRPC_PORT, "protocol": "TCP"}]
    )
    (peer,) = to_pods["to"]
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "server"
    assert peer["namespaceSelector"]["matchExpressions"][0]["values"] == ["prod", "crawl-jobs"]


def test_networkpolicy_default_targets_exclude_cloud_metadata_and_non_public_ranges() -> None:
    """Direct fetches reach public addresses of both families, and none of the ranges the SSRF guard
    refuses: the metadata addresses (IPv4's and AWS's IPv6 one), link-local, private, unique-local."""
    r = render({"networkPolicy": {"enabled": True}})
    egress = r.get("NetworkPolicy", "demo-fetchpool")["spec"]["egress"]
    blocks = [p["ipBlock"] for rule in egress for p in rule.get("to", []) if "ipBlock" in p]

    def allowed(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(
            ip.version == ipaddress.ip_network(b["cidr"]).version
            and ip in ipaddress.ip_network(b["cidr"])
            and not any(ip in ipaddress.ip_network(e) for e in b.get("except", []))
            for b in blocks
        )

    for refused in (
        "169.254.169.254",  # cloud metadata (AWS, GCP, Azure, OCI)
        "169.254.170.2",  # ECS task metadata
        "fd00:ec2::254",  # AWS metadata over IPv6
        "fe80::1",  # IPv6 link-local
        "fd12:3456::1",  # unique-local (IPv6's private)
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",  # CGNAT
    ):
        assert not allowed(refused), refused
    for public in ("93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "2001:4860:4860::8888"):
        assert allowed(public), public
    # Each except lies within its block, as the API server requires.
    for block in blocks:
        network = ipaddress.ip_network(block["cidr"])
        assert all(ipaddress.ip_network(e).subnet_of(network) for e in block.get("except", []))  # type: ignore[arg-type]
    assert not render("default").has("NetworkPolicy")


def test_networkpolicy_self_served_test_page() -> None:
    """With tests.fetchUrl empty the service fetches the test pod's page: egress to it is allowed,
    and the guard lets it through only because ssrf.allowTargets says so."""
    r = render(
        {"networkPolicy": {"enabled": True}, "tests": {"fetchUrl": ""}, "ssrf": {"allowTargets": ["10.244.0.0/16"]}}
    )
    egress = r.get("NetworkPolicy", "demo-fetchpool")["spec"]["egress"]
    rule = next(rule for rule in egress if rule.get("ports") == [{"port": 8080, "protocol": "TCP"}])
    assert rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "test"
    (container,) = r.get("Pod")["spec"]["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert r.configmap_env()["FETCHPOOL_ALLOW_TARGETS"] == "10.244.0.0/16"


def test_networkpolicy_operator_metrics_scrapers() -> None:
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    r = render({"networkPolicy": {"enabled": True, "ingress": {"metricsFrom": peers}}, "metrics": {"enabled": True}})
    for name, port in (("demo-fetchpool", 9464), ("demo-fetchpool-operator", 9090)):
        ingress = r.get("NetworkPolicy", name)["spec"]["ingress"]
        assert {"ports": [{"port": port, "protocol": "TCP"}], "from": peers} in ingress, name


# --- helm test ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_test_hook_pod(value_set: str) -> None:
    r = render(value_set)
    pod = r.get("Pod", f"{fullname(r)}-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "before-hook-creation" in pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    assert pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == r.server_container()["image"]
    program = container["command"][2]
    assert "HealthStub" in program and "FetchServiceStub" in program
    env = env_of(container)
    assert env["FP_TARGET"]["value"] == f"{fullname(r)}:50051"
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "test"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_test_fetches_what_the_ssrf_guard_allows(value_set: str) -> None:
    """The test's fetch must pass the service's SSRF guard: a public URL by default; the pod's own
    page (a cluster-internal address) only when ssrf.allowTargets opens it."""
    import urllib.parse

    r = render(value_set)
    (container,) = r.get("Pod", f"{fullname(r)}-test")["spec"]["containers"]
    url = env_of(container)["FP_FETCH_URL"]["value"]
    cm = r.configmap_env()
    allow = [a for a in cm.get("FETCHPOOL_ALLOW_TARGETS", "").split(",") if a]
    if not url:
        assert cm["FETCHPOOL_SSRF_GUARD"] == "false" or allow
        return
    assert url == "https://example.com/"
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        assert ipaddress.ip_address(host).is_global
    except ValueError:
        assert not host.endswith((".svc", ".cluster.local", ".internal", ".local", "localhost")), host


def test_helm_test_default_url_is_public() -> None:
    (container,) = render("default").get("Pod")["spec"]["containers"]
    assert env_of(container)["FP_FETCH_URL"]["value"] == "https://example.com/"
    assert "ports" not in container, "no page server without the self-served mode"


@pytest.mark.parametrize("value_set", ["default", "hpa", "keda"])
def test_notes_tell_what_the_operator_will_do(value_set: str) -> None:
    """NOTES.txt's numbers (Helm's arithmetic) are the operator's own (fetchpool.operator.budget) for
    the objects the chart renders: the ceiling, and each replica's share at the fewest replicas."""
    budget_module = pytest.importorskip("fetchpool.operator.budget")
    resource = pytest.importorskip("fetchpool.operator.resource")
    r = render(value_set)
    fp = r.get("FetchPool")["spec"]
    deployment = r.server()
    if r.has("HorizontalPodAutoscaler"):
        most, least = (r.get("HorizontalPodAutoscaler")["spec"][k] for k in ("maxReplicas", "minReplicas"))
    elif r.has("ScaledObject"):
        so = r.get("ScaledObject")["spec"]
        most, least = so["maxReplicaCount"], max(1, so["minReplicaCount"])
    else:
        most = least = deployment["spec"]["replicas"]
    ceiling = budget_module.ceiling(scaler_max=most, counts=[least], surge=resource.max_surge_of(deployment, most))
    share = (fp["connectionBudget"] - fp["minPerReplica"] * (ceiling - least)) // least
    share = max(min(share, fp["maxPerReplica"]), fp["minPerReplica"])
    notes = " ".join(r.notes.split())
    assert f"budget of {fp['connectionBudget']} connections" in notes
    assert f"A pod starts with minPerReplica = {fp['minPerReplica']} connections" in notes
    assert f"(up to {ceiling}: the most replicas plus maxSurge)" in notes
    assert f"with {least} replicas, {share} connections each" in notes
    if value_set == "default":
        assert (ceiling, least, share) == (3, 2, 195)  # the README's first-install numbers
        readme = " ".join((chartlib.CHART / "README.md").read_text().split())
        assert (f"each pod starts at {fp['minPerReplica']} connections per pool (`operator.fetchPool.minPerReplica`) "
                f"and the operator raises it to its share of the budget, {share} with {least} replicas") in readme
        assert "nothing scales it: its replicas (kubectl scale re-divides)" in notes
