"""Generate deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/rules/*.yml.

One PrometheusRule (Prometheus Operator) holding exactly the groups of the rules files that
compose's Prometheus loads, so Kubernetes gets the same recording rules and alerts, with the
same unit tests behind them. `release: prometheus` matches kube-prometheus-stack's default
ruleSelector for a release named "prometheus" (as in servicemonitor.yaml).

    python deploy/k8s/gen_prometheusrule.py           # (re)write the file
    python deploy/k8s/gen_prometheusrule.py --check   # exit 1 when it is out of date

tests/system/test_promtool.py runs the check and compares the groups, so a rule edit without
a regeneration fails CI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RULES = REPO / "deploy" / "prometheus" / "rules"
OUTPUT = HERE / "base" / "prometheusrule.yaml"
HEADER = (
    "# Generated from deploy/prometheus/rules/*.yml by deploy/k8s/gen_prometheusrule.py:\n"
    "# edit the rules there, then run it.\n"
)


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line expressions as `|` blocks, as in the rules files."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str)


def rule_files(directory: Path = RULES) -> list[Path]:
    return sorted(directory.glob("*.yml"))


def groups(files: list[Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in files:
        out += yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    return out


def prometheus_rule(files: list[Path]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "affinity-node",
            "labels": {
                "app.kubernetes.io/name": "affinity-node",
                "app.kubernetes.io/component": "alerts",
                "release": "prometheus",
            },
        },
        "spec": {"groups": groups(files)},
    }


def render(files: list[Path]) -> str:
    body = yaml.dump(
        prometheus_rule(files), Dumper=_LiteralDumper, sort_keys=False, width=1_000_000
    )
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the output is stale")
    args = parser.parse_args(argv)
    wanted = render(rule_files())
    current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else None
    if args.check:
        if current != wanted:
            print(
                f"{OUTPUT} is out of date: run python {Path(__file__).relative_to(REPO)}",
                file=sys.stderr,
            )
            return 1
        return 0
    if current != wanted:
        OUTPUT.write_text(wanted, encoding="utf-8")
        print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
