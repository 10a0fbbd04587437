"""Migration files keep to the patterns that do not stop binding writes fleet-wide.

On a hot table, an index is built CONCURRENTLY in a `-- affinity: no-transaction` file (with
IF NOT EXISTS: a crash reruns the file), and a CHECK constraint is added NOT VALID, then
VALIDATEd by a separate statement. 0002 (CHECK with its new column, under an exclusive lock) and
0005 (a plain CREATE INDEX) predate this rule; they were applied on every existing database and
cannot change (their checksums are recorded): only new installs run them, on empty tables.
"""

from __future__ import annotations

import re

import pytest

from affinity_node.store.migrate import Migration, load_migrations, split_statements

HOT_TABLES = ("api_key_model_affinity", "api_keys", "usage_ledger", "affinity_backends")
GRANDFATHERED = {"0002_binding_sets.sql", "0005_incremental_resync.sql"}

_INDEX = re.compile(
    r"\bCREATE\s+(UNIQUE\s+)?INDEX\b(?P<rest>.*?)\bON\s+(ONLY\s+)?(?P<table>\w+)", re.I | re.S
)
_ALTER = re.compile(r"\bALTER\s+TABLE\s+(ONLY\s+)?(IF\s+EXISTS\s+)?(?P<table>\w+)", re.I)
_CHECK = re.compile(r"\bCHECK\s*\(", re.I)


def _code(statement: str) -> str:
    return "\n".join(ln.split("--", 1)[0] for ln in statement.splitlines())


def problems(m: Migration) -> list[str]:
    """What in one file would hold a hot table's writers behind a long lock."""
    found: list[str] = []
    statements = [_code(s) for s in split_statements(m.sql)]
    # A table this file creates is empty and unseen: nothing waits on it yet.
    created = {
        t.lower() for s in statements for t in re.findall(r"CREATE\s+TABLE\s+(\w+)", s, re.I)
    }
    hot = set(HOT_TABLES) - created
    for s in statements:
        index = _INDEX.search(s)
        if index and index.group("table") in hot:
            if "CONCURRENTLY" not in index.group("rest").upper() or m.transactional:
                found.append(
                    f"index on {index.group('table')} not CONCURRENTLY outside a transaction"
                )
            elif "IF NOT EXISTS" not in index.group("rest").upper():
                found.append(f"index on {index.group('table')} without IF NOT EXISTS (reruns)")
        alter = _ALTER.search(s)
        if alter and alter.group("table") in hot and _CHECK.search(s):
            added = re.search(r"ADD\s+CONSTRAINT\s+(\w+)", s, re.I)
            if not added or "NOT VALID" not in s.upper():
                found.append(f"CHECK on {alter.group('table')} not added NOT VALID")
            elif not any(
                re.search(rf"VALIDATE\s+CONSTRAINT\s+{added.group(1)}\b", t, re.I)
                for t in statements
            ):
                found.append(f"constraint {added.group(1)} never VALIDATEd")
    return found


def test_every_new_migration_keeps_hot_tables_writable() -> None:
    found = {m.name: problems(m) for m in load_migrations() if m.name not in GRANDFATHERED}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_grandfathered_files_are_the_ones_the_lint_catches() -> None:
    """The exceptions are real (else the list should shrink) and the lint sees them."""
    by_name = {m.name: m for m in load_migrations()}
    for name in GRANDFATHERED:
        assert problems(by_name[name]), name


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("CREATE INDEX i ON api_key_model_affinity (model);", "not CONCURRENTLY"),
        ("CREATE INDEX CONCURRENTLY i ON api_keys (name);", "not CONCURRENTLY"),
        (
            "-- affinity: no-transaction\nCREATE INDEX CONCURRENTLY i ON api_keys (name);",
            "IF NOT EXISTS",
        ),
        ("ALTER TABLE api_keys ADD CONSTRAINT c CHECK (length(name) < 9);", "NOT VALID"),
        ("ALTER TABLE usage_ledger ADD COLUMN x int CHECK (x > 0);", "NOT VALID"),
        ("ALTER TABLE api_keys ADD CONSTRAINT c CHECK (length(name) < 9) NOT VALID;", "never"),
    ],
)
def test_the_lint_catches_unsafe_patterns(sql: str, expected: str) -> None:
    found = problems(Migration("0999_x.sql", sql))
    assert found and expected in found[0]


def test_the_safe_patterns_pass() -> None:
    sql = (
        "-- affinity: no-transaction\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON api_key_model_affinity (model);\n"
        "ALTER TABLE api_keys ADD CONSTRAINT c CHECK (length(name) < 9) NOT VALID;\n"
        "ALTER TABLE api_keys VALIDATE CONSTRAINT c;\n"
        "CREATE INDEX j ON some_new_table (x);\n"
    )
    assert problems(Migration("0999_x.sql", sql)) == []


def test_statements_split_around_quotes_and_function_bodies() -> None:
    sql = "SELECT ';';\nCREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;\n-- x;\n"
    assert split_statements(sql) == [
        "SELECT ';'",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$",
    ]
