"""Generate deploy/k8s/base/grafana-dashboards.yaml from grafana/dashboards/*.json.

One ConfigMap per dashboard, labelled `grafana_dashboard: "1"`, which is what the Grafana
dashboard sidecar (kube-prometheus-stack, the Grafana Helm chart) loads. The JSON is embedded
verbatim, so the cluster gets exactly what users import by hand.

    python deploy/k8s/gen_dashboards.py           # (re)write the file, list it in kustomization
    python deploy/k8s/gen_dashboards.py --check   # exit 1 when the file is out of date

tests/system/test_deploy.py runs the check, so a dashboard edit without a regeneration fails CI.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DASHBOARDS = REPO / "grafana" / "dashboards"
OUTPUT = HERE / "base" / "grafana-dashboards.yaml"
KUSTOMIZATION = HERE / "base" / "kustomization.yaml"
MAX_CONFIGMAP_BYTES = 1_000_000  # the API server refuses objects above ~1 MiB
HEADER = "# Generated from grafana/dashboards/*.json by deploy/k8s/gen_dashboards.py.\n"


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings as `|` blocks, so the embedded JSON stays readable in diffs."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str)


def dashboard_files(directory: Path = DASHBOARDS) -> list[Path]:
    return sorted(directory.glob("*.json"))


def configmap_name(path: Path) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", path.stem.lower()).strip("-")
    return f"affinity-node-dashboard-{slug}"


def configmap(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    json.loads(text)  # refuse to ship a broken dashboard
    if len(text.encode()) > MAX_CONFIGMAP_BYTES:
        raise SystemExit(f"{path}: too large for one ConfigMap ({len(text)} bytes)")
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(path),
            "labels": {
                "app.kubernetes.io/name": "affinity-node",
                "app.kubernetes.io/component": "dashboards",
                "grafana_dashboard": "1",
            },
            # Honoured by the sidecar when its folderAnnotation is set to grafana_folder.
            "annotations": {"grafana_folder": "Affinity"},
        },
        "data": {path.name: text},
    }


def render(files: list[Path]) -> str:
    docs = [
        yaml.dump(configmap(f), Dumper=_LiteralDumper, sort_keys=False, width=1_000_000)
        for f in files
    ]
    return HEADER + "---\n".join(docs)


def ensure_listed(kustomization: Path = KUSTOMIZATION, name: str = OUTPUT.name) -> bool:
    """Appends `name` to the resources of kustomization.yaml; True when it changed the file."""
    text = kustomization.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if name in data.get("resources", []):
        return False
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("resources:"))
    end = start + 1
    while end < len(lines) and lines[end].startswith(("  -", "  #")):
        end += 1
    lines.insert(end, f"  - {name}\n")
    kustomization.write_text("".join(lines), encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the output is stale")
    args = parser.parse_args(argv)
    files = dashboard_files()
    if not files:
        print(f"no dashboards in {DASHBOARDS}: nothing to generate", file=sys.stderr)
        return 0
    wanted = render(files)
    current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else None
    if args.check:
        if current != wanted:
            print(f"{OUTPUT} is out of date: run python {Path(__file__).relative_to(REPO)}",
                  file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        OUTPUT.write_text(wanted, encoding="utf-8")
        print(f"wrote {OUTPUT.relative_to(REPO)} ({len(files)} dashboard(s))")
    if ensure_listed():
        print(f"listed {OUTPUT.name} in {KUSTOMIZATION.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
