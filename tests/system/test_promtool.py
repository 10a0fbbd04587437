"""The Prometheus files in deploy/prometheus pass promtool: config, rules, rule unit tests."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.support.tools import require_tool

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
RUNBOOK = REPO / "deploy" / "RUNBOOK.md"
RUNBOOK_BASE = "{{ $externalLabels.runbook_base }}"
RUNBOOK_URL = re.compile(re.escape(RUNBOOK_BASE) + r"/deploy/RUNBOOK\.md#([a-z0-9-]+)")
"""Every runbook_url: one setting for the base (Prometheus's external label `runbook_base`:
deploy/README.md, "Alerts"), then the alert's section of deploy/RUNBOOK.md."""
KUBERNETES_SERIES = re.compile(r"\b(?:container|kube)_\w+")
"""Series from the kubelet and kube-state-metrics: their job is theirs, not the node's."""
RUNBOOK_PARTS = ("**Symptom.**", "**Likely causes.**", "**What to check.**", "**What to do.**")


def require_binary(name: str) -> str:
    """promtool or prometheus (tests/support/tools.py: skip, or fail under CI=true)."""
    return require_tool(name, "apt-get install prometheus")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROMETHEUS_DIR,
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"


def test_the_files_exist():
    assert (PROMETHEUS_DIR / "prometheus.yml").is_file()
    assert RULES, "no rule files in deploy/prometheus/rules"
    assert RULE_TESTS, "no rule unit tests in deploy/prometheus/tests"


def test_check_config():
    result = promtool("check", "config", "prometheus.yml")
    assert_ok(result)
    # The rule files are found through the config's glob, not only checked on their own.
    assert f"SUCCESS: {len(RULES)} rule files found" in result.stdout + result.stderr


def test_check_rules():
    assert_ok(promtool("check", "rules", *map(str, RULES)))


def test_rule_unit_tests():
    assert_ok(promtool("test", "rules", *map(str, RULE_TESTS)))


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def unit_cases() -> list[dict[str, Any]]:
    return [
        case
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]


def test_every_alert_has_a_unit_test_that_fires_it():
    alerts = {
        rule["alert"]
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    fired: set[str] = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                if case.get("exp_alerts"):
                    fired.add(case["alertname"])
    assert alerts - fired == set(), "alerts without a firing unit test"
    assert {
        "AffinityNodeDown",
        "AffinityHighErrorRatio",
        "AffinityNoHealthyBackend",
        "AffinityListenerDown",
        "AffinityDatabaseDown",
        "AffinityLockWaitHigh",
        "AffinityHitRatioCollapse",
        # issue 26: what loses data or will, and the availability SLO
        "AffinityLedgerRowsDropped",
        "AffinityNotificationsRejected",
        "AffinityNotifyQueueFilling",
        "AffinityMemoryNearLimit",
        "AffinityAutoscalerAtMax",
        "AffinityErrorBudgetBurnFast",
        "AffinityErrorBudgetBurnSlow",
    } <= alerts
    severities = {
        rule["alert"]: rule["labels"]["severity"]
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    assert severities["AffinityDatabaseDown"] == "warning"  # affinity is a hint


def test_compose_config_discovers_every_node_replica_and_the_backends():
    cfg = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    node = jobs["affinity-node"]  # the alerts select job="affinity-node"
    assert node["dns_sd_configs"] == [
        {"names": ["node"], "type": "A", "port": 8081, "refresh_interval": "15s"}
    ]
    targets = [t for sc in jobs["vllm"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"backend{i}:8000" for i in range(1, 5)]


def test_every_alert_also_has_a_quiet_case():
    quiet = {c["alertname"] for c in unit_cases() if not c.get("exp_alerts")}
    assert {r["alert"] for r in alert_rules()} - quiet == set()


def test_pages_are_fleet_level_sustained_and_grouped_by_job_and_namespace():
    """critical = users see it: aggregated over the nodes (never one instance), with a `for:`
    of at least 2 minutes; every aggregation keeps job and namespace apart."""
    rules = alert_rules()
    severities = {r["alert"]: r["labels"]["severity"] for r in rules}
    assert set(severities.values()) == {"critical", "warning"}
    assert severities["AffinityNodeDown"] == "warning"  # one replica down is no page
    assert severities["AffinityDatabaseDown"] == "warning"
    assert severities["AffinityDatabaseDownLong"] == "critical"  # the escalation
    assert {"AffinityProxyOverheadHigh", "AffinityTTFTHigh"} <= set(severities)
    minutes = {"m": 1, "h": 60}
    for rule in rules:
        if rule["labels"]["severity"] != "critical":
            continue
        amount, unit = re.fullmatch(r"(\d+)([mh])", rule["for"]).groups()  # type: ignore[union-attr]
        assert int(amount) * minutes[unit] >= 2, rule["alert"]
        assert "instance" not in rule["expr"], rule["alert"]
    for case in unit_cases():
        if severities[case["alertname"]] == "critical":
            for alert in case.get("exp_alerts") or []:
                assert "instance" not in alert["exp_labels"], case["alertname"]
    every_rule = [
        r
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for r in group["rules"]
    ]
    for rule in every_rule:
        # Kubernetes-side series (cAdvisor, kube-state-metrics) carry their exporter's job:
        # they are kept apart by namespace (and pod) alone.
        kept_apart = (
            {"namespace"} if KUBERNETES_SERIES.search(rule["expr"]) else {"job", "namespace"}
        )
        for grouping in re.findall(r"\b(?:sum|max|min|count|avg) by \(([^)]*)\)", rule["expr"]):
            labels = {x.strip() for x in grouping.split(",")}
            assert kept_apart <= labels, (rule.get("alert") or rule["record"], grouping)


def test_ratio_alerts_have_a_traffic_guard():
    for rule in alert_rules():
        expr = rule["expr"]
        if "histogram_quantile" in expr or " / " in expr.replace("\n", " "):
            assert re.search(r"\band\b", expr), f"{rule['alert']}: no minimum-traffic guard"


def github_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_every_alert_links_a_runbook_section_that_says_what_to_do():
    text = RUNBOOK.read_text(encoding="utf-8")
    sections = dict(
        (github_anchor(m.group(1)), m.group(2))
        for m in re.finditer(r"^## ([^\n]+)\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    )
    bases = set()
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        m = RUNBOOK_URL.fullmatch(url)
        assert m, url
        bases.add(url[: m.start(1)])
        anchor = m.group(1)
        assert anchor == github_anchor(rule["alert"]), url
        assert anchor in sections, f"{rule['alert']}: no section in deploy/RUNBOOK.md"
        for part in RUNBOOK_PARTS:
            assert part in sections[anchor], f"{rule['alert']}: its runbook lacks {part}"
    assert bases == {RUNBOOK_BASE + "/deploy/RUNBOOK.md#"}, bases


def test_the_runbook_base_is_one_setting_that_every_rule_test_sets():
    """No placeholder in the rules: compose's Prometheus sets the external label, and every
    unit test group sets it too, so promtool checks the rendered runbook_url."""
    cfg = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert cfg["global"]["external_labels"]["runbook_base"].startswith("https://")
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            assert test["external_labels"]["runbook_base"].startswith("https://"), test["name"]
    for case in unit_cases():
        for alert in case.get("exp_alerts") or []:
            url = alert["exp_annotations"]["runbook_url"]
            assert "{{" not in url and url.startswith("https://"), url


def test_burn_rate_alerts_use_two_windows_each():
    """Multi-window burn rates: each threshold on a long window is confirmed by a short one
    (the short window first: its ratio is the alert's value, the error rate now)."""
    rules = {r["alert"]: r for r in alert_rules()}
    fast = rules["AffinityErrorBudgetBurnFast"]["expr"]
    slow = rules["AffinityErrorBudgetBurnSlow"]["expr"]
    assert re.findall(r"ratio_rate(\w+) > \(14\.4 \* 0\.001\)", fast) == ["5m", "1h"]
    assert re.findall(r"ratio_rate(\w+) > \(6 \* 0\.001\)", fast) == ["30m", "6h"]
    assert re.findall(r"ratio_rate(\w+) > \(3 \* 0\.001\)", slow) == ["2h", "1d"]
    assert rules["AffinityErrorBudgetBurnFast"]["labels"]["severity"] == "critical"
    assert rules["AffinityErrorBudgetBurnSlow"]["labels"]["severity"] == "warning"


def gen_prometheusrule() -> ModuleType:
    path = REPO / "deploy" / "k8s" / "gen_prometheusrule.py"
    spec = importlib.util.spec_from_file_location("gen_prometheusrule", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_kubernetes_prometheusrule_is_the_rules_file(tmp_path):
    """Kubernetes gets exactly what compose's Prometheus loads and the unit tests cover."""
    gen = gen_prometheusrule()
    output = gen.OUTPUT
    if output.read_text() != gen.render(gen.rule_files()):
        pytest.fail(f"{output} is stale: run python deploy/k8s/gen_prometheusrule.py")
    rule = yaml.safe_load(output.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["metadata"]["labels"]["release"]
    from_files = [g for path in RULES for g in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == from_files
    kustomization = yaml.safe_load((output.parent / "kustomization.yaml").read_text())
    assert output.name in kustomization["resources"]
    # And promtool accepts the groups as the operator will hand them to Prometheus.
    extracted = tmp_path / "from-prometheusrule.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    assert_ok(promtool("check", "rules", str(extracted)))
