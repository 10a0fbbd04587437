"""The benchmarks' own named SQL (bench_queries.sql), kept out of the node's queries.sql: the
product's statement file holds only what the node runs."""

from __future__ import annotations

import re
from pathlib import Path

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
SQL_FILE = Path(__file__).with_name("bench_queries.sql")


def load_named(text: str) -> dict[str, str]:
    """`-- name:` sections to statements, comment lines dropped (store/queries.py's format)."""
    parts = _HEADER.split(text)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [ln for ln in body.strip().splitlines() if not ln.lstrip().startswith("--")]
        found[name] = "\n".join(lines).strip().rstrip(";")
    return found


BENCH_QUERIES: dict[str, str] = load_named(SQL_FILE.read_text(encoding="utf-8"))
