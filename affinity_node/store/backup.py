"""`affinity-node backup` / `restore`: a logical export of what cannot be rebuilt.

API keys (every tenant's credentials, hashed), the backend registry and the usage ledger
(billing data), with COPY in binary form, into one zip file: a manifest (format, the schema's
applied migrations, each table's columns and row count) and one member per table. It needs no
pg_dump of the server's major version (Debian's pg_dump 15 cannot dump an 18 server).

Bindings are soft state and are not backed up. A restore runs in one transaction on a
migrated database: it empties the bindings, replaces the tables, and raises the deletion-log
horizon above every node's watermark with a doorbell, so every node reloads in full instead of
trusting a cache that no longer matches the table.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from affinity_node.store.queries import QUERIES as Q

FORMAT = 1
TABLES = ("api_keys", "affinity_backends", "usage_ledger", "usage_ledger_writers")
"""In restore order (foreign keys: the ledger references api_keys)."""


class BackupError(RuntimeError):
    """The file is not a backup this code can restore, or the database is not ready for it."""


@dataclass(frozen=True, slots=True)
class TableCount:
    table: str
    rows: int


async def backup(conn: asyncpg.Connection, out: Path) -> list[TableCount]:
    """One consistent snapshot (REPEATABLE READ, read-only) of every table, written to `out`."""
    counts: list[TableCount] = []
    manifest: dict[str, object] = {"format": FORMAT, "created_at": datetime.now(UTC).isoformat()}
    tmp = out.with_name(out.name + ".partial")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            manifest["schema"] = sorted(r["name"] for r in await conn.fetch(Q["schema_applied"]))
            tables: dict[str, object] = {}
            for table in TABLES:
                columns = [r[0] for r in await conn.fetch(Q["backup_columns"], table)]
                buf = io.BytesIO()
                status = await conn.copy_from_table(
                    table, columns=columns, output=buf, format="binary"
                )
                rows = int(status.split()[-1])
                z.writestr(f"{table}.copy", buf.getvalue())
                tables[table] = {"columns": columns, "rows": rows}
                counts.append(TableCount(table, rows))
            manifest["tables"] = tables
        z.writestr("manifest.json", json.dumps(manifest, indent=2))
    tmp.replace(out)
    return counts


def _manifest(z: zipfile.ZipFile) -> dict[str, object]:
    try:
        data = json.loads(z.read("manifest.json"))
    except (KeyError, ValueError) as exc:
        raise BackupError(f"not an affinity-node backup: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BackupError("not an affinity-node backup of a format this version reads")
    return data


async def restore(conn: asyncpg.Connection, src: Path) -> list[TableCount]:
    """Replace keys, registry and ledger with the file's, in one transaction."""
    with zipfile.ZipFile(src) as z:
        manifest = _manifest(z)
        tables = manifest["tables"]
        assert isinstance(tables, dict)
        async with conn.transaction():
            await _check_schema(conn, manifest)
            await conn.execute(Q["restore_truncate"])
            await conn.execute(Q["restore_delete_keys"])
            await conn.execute(Q["restore_delete_registry"])
            counts = []
            for table in TABLES:
                columns = list(tables[table]["columns"])
                status = await conn.copy_to_table(
                    table, source=io.BytesIO(z.read(f"{table}.copy")), columns=columns,
                    format="binary",
                )  # fmt: skip
                counts.append(TableCount(table, int(status.split()[-1])))
            horizon = await conn.fetchval(Q["restore_horizon"])
            await conn.execute(Q["restore_doorbell"], horizon)
    return counts


async def _check_schema(conn: asyncpg.Connection, manifest: dict[str, object]) -> None:
    """The database must hold at least the backup's schema (run `migrate` first)."""
    try:
        applied = {r["name"] for r in await conn.fetch(Q["schema_applied"])}
    except asyncpg.UndefinedTableError:
        applied = set()
    schema = manifest.get("schema")
    missing = sorted(set(schema) - applied) if isinstance(schema, list) else ["?"]
    if missing:
        raise BackupError(
            f"the database lacks migrations the backup was taken with ({', '.join(missing)}): "
            "run `affinity-node migrate` first"
        )
