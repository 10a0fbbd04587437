"""The Prometheus files in deploy/prometheus pass promtool: config, rules, rule unit tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))


def require_binary(name: str) -> str:
    """The binary's path; skips when absent, except under CI=true where that is a failure."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is not installed (CI installs it: see .ci/run)")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


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
