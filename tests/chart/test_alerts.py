"""The chart's PrometheusRule, with the real promtool (Debian's `prometheus` package):
`promtool check rules` on every way it renders, `promtool test rules` (tests/chart/alerts-test.yaml)
with a firing and a quiet case of every alert, and a runbook for every alert in the chart README."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import chartlib
import pytest
import yaml

UNIT_TESTS = Path(__file__).with_name("alerts-test.yaml")
RULES_ON = {"metrics": {"enabled": True, "prometheusRule": {"enabled": True}}}
SERVICE_ALERTS = {"FetchpoolPoolExhausted", "FetchpoolPoolTimeouts", "FetchpoolFetchErrors", "FetchpoolProxyEjected"}
OPERATOR_ALERTS = {
    "FetchpoolOperatorDegraded",
    "FetchpoolFetchPoolConflict",
    "FetchpoolOverBudget",
    "FetchpoolLimitsUnconfirmed",
    "FetchpoolOperatorAbsent",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool missing: `make system-deps` installs Debian's prometheus package", pytrace=False)
    return path


def rule_groups(values: str | dict[str, Any]) -> list[dict[str, Any]]:
    return chartlib.render(values).get("PrometheusRule")["spec"]["groups"]


def alerts(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def write_rules(directory: Path, groups: list[dict[str, Any]]) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


VARIANTS = {
    "defaults": RULES_ON,
    "ci-hpa": "hpa",  # thresholds changed, runbook URLs, labels
    "no-operator": {**RULES_ON, "operator": {"enabled": False}},
    "custom-selectors": {
        "metrics": {
            "enabled": True,
            "prometheusRule": {
                "enabled": True,
                "serviceSelector": 'job="crawl",kubernetes_namespace="{{ .Release.Namespace }}"',
                "operatorSelector": 'fetchpool=~"crawl-.*"',
            },
        }
    },
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_promtool_check_rules(promtool: str, variant: str, tmp_path: Path) -> None:
    groups = rule_groups(VARIANTS[variant])
    proc = subprocess.run([promtool, "check", "rules", str(write_rules(tmp_path, groups))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = SERVICE_ALERTS if variant == "no-operator" else SERVICE_ALERTS | OPERATOR_ALERTS
    assert set(alerts(groups)) == expected
    assert f"SUCCESS: {len(expected)} rules found" in proc.stdout


def test_promtool_unit_tests_of_every_alert(promtool: str, tmp_path: Path) -> None:
    groups = rule_groups(RULES_ON)
    write_rules(tmp_path, groups)
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    proc = subprocess.run([promtool, "test", "rules", UNIT_TESTS.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
    # Every alert fires in some case (labels and annotations checked) and stays quiet in another.
    cases = [case for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    firing = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert firing == quiet == set(alerts(groups)) == SERVICE_ALERTS | OPERATOR_ALERTS


def test_unit_tests_fail_when_a_rule_changes(promtool: str, tmp_path: Path) -> None:
    """The unit tests see the thresholds: a rule that fires later fails them."""
    values = {
        "metrics": {
            "enabled": True,
            "prometheusRule": {"enabled": True, "alerts": {"overBudget": {"for": "10m"}}},
        }
    }
    write_rules(tmp_path, rule_groups(values))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    proc = subprocess.run([promtool, "test", "rules", UNIT_TESTS.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "FetchpoolOverBudget" in proc.stdout + proc.stderr


def test_rules_select_this_release_only() -> None:
    for name, rule in alerts(rule_groups(RULES_ON)).items():
        selector = 'service="demo-fetchpool"' if name in SERVICE_ALERTS else 'fetchpool="demo-fetchpool"'
        metrics = re.findall(r"\b([a-z_]+)\{([^}]*)\}", rule["expr"])
        assert metrics, name
        for metric, matchers in metrics:
            assert 'namespace="prod"' in matchers and selector in matchers, f"{name}: {metric}{{{matchers}}}"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert "runbook_url" not in rule["annotations"], "no runbook_url without metrics.prometheusRule.runbookUrl"


def test_alerts_can_be_tuned_and_turned_off() -> None:
    ci = alerts(rule_groups("hpa"))
    assert ci["FetchpoolFetchErrors"]["for"] == "30m" and ci["FetchpoolFetchErrors"]["expr"].endswith("> 0.2")
    values = {"metrics": {"enabled": True, "prometheusRule": {"enabled": True, "alerts": {
        "proxyEjected": {"enabled": False}, "overBudget": {"severity": "page"}}}}}
    tuned = alerts(rule_groups(values))
    assert "FetchpoolProxyEjected" not in tuned and tuned["FetchpoolOverBudget"]["labels"]["severity"] == "page"
    r = chartlib.render("hpa")
    rule = r.get("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert not chartlib.render("default").has("PrometheusRule")


def _readme_runbooks() -> dict[str, str]:
    text = (chartlib.CHART / "README.md").read_text()
    section = text.split("\n## Alerts\n", 1)[1].split("\n## ", 1)[0]
    return {m[0]: m[1].strip() for m in re.findall(r"^#### (\w+)\n(.*?)(?=^#### |\Z)", section, re.S | re.M)}


def test_every_alert_has_a_runbook_in_the_readme() -> None:
    runbooks = _readme_runbooks()
    ci = alerts(rule_groups("hpa"))
    assert set(runbooks) == set(ci) == SERVICE_ALERTS | OPERATOR_ALERTS
    for name, rule in ci.items():
        assert len(runbooks[name]) > 80, f"{name}: the runbook says what to check and what to do"
        # runbook_url points at the alert's heading (GitHub's and GitLab's anchors: the lower-case name).
        assert rule["annotations"]["runbook_url"] == (
            f"https://git.example.com/crawl/fetchpool/-/blob/main/helm/fetchpool/README.md#{name.lower()}"
        )
