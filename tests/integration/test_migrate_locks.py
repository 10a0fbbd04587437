"""Migrations under traffic: every lock wait is bounded and retried, so a migration queued
behind a long transaction never queues the fleet's binding writes behind itself; files marked
`-- affinity: no-transaction` run statement by statement (CREATE INDEX CONCURRENTLY)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

import asyncpg
import pytest

from affinity_node.store.migrate import LockPolicy, migrate, migrations_dir
from tests.support.nodes import new_key
from tests.support.waiting import wait_for

FAST = LockPolicy(lock_timeout_ms=100, attempts=500, backoff_s=0.05, backoff_max_s=0.2)
WRITES = 20


def _with_extra(tmp_path: Path, name: str, sql: str) -> Path:
    work = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), work)
    (work / name).write_text(sql, encoding="utf-8")
    return work


def _waits(caplog: pytest.LogCaptureFixture, name: str) -> int:
    return sum(1 for r in caplog.records if "waited" in r.getMessage() and name in r.getMessage())


async def _binding_writes(dsn: str, count: int) -> list[float]:
    """Cold-miss-shaped writes on the hot table, each bounded by a statement timeout."""
    conn = await asyncpg.connect(dsn, server_settings={"statement_timeout": "3000"})
    try:
        key = await new_key(conn, "writer")
        took = []
        for i in range(count):
            started = time.monotonic()
            await conn.execute(
                "INSERT INTO api_key_model_affinity (api_key_id, model, provider_url, version, "
                "expires_at) VALUES ($1, $2, 'http://b:1', 0, now() + interval '1 hour')",
                key,
                f"m{i}",
            )
            took.append(time.monotonic() - started)
        return took
    finally:
        await conn.close()


async def test_a_migration_behind_a_long_reader_waits_and_retries_while_writes_go_on(
    dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = "0999_alter_bindings.sql"
    work = _with_extra(tmp_path, name, "ALTER TABLE api_key_model_affinity ADD COLUMN note text;\n")
    caplog.set_level(logging.WARNING, logger="affinity_node.store.migrate")
    holder = await asyncpg.connect(dsn)
    tx = holder.transaction()
    await tx.start()
    await holder.fetchval("SELECT count(*) FROM api_key_model_affinity")  # ACCESS SHARE, held
    task = asyncio.create_task(migrate(dsn, work, FAST))
    try:
        await wait_for(lambda: _waits(caplog, name) >= 2, 10, "the migration to wait twice")
        took = await _binding_writes(dsn, WRITES)
        # Each write waited at most for one lock_timeout of the migration, never for the reader.
        assert len(took) == WRITES and max(took) < 1.0, took
        assert not task.done()  # still behind the reader, retrying
    finally:
        await tx.rollback()
        await holder.close()
    assert await asyncio.wait_for(task, 10) == [name]
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_name = 'api_key_model_affinity' AND column_name = 'note'"
        )
    finally:
        await conn.close()


async def test_a_no_transaction_file_builds_an_index_concurrently_past_an_open_writer(
    dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The build waits for an open writer; each timed-out wait leaves an invalid index, which
    the retry drops before building again. Writes go on meanwhile; the end index is valid."""
    name = "0999_index_concurrently.sql"
    sql = (
        "-- affinity: no-transaction\n"
        "-- A second index on the hot table, built without blocking writes.\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS api_key_model_affinity_updated_idx\n"
        "    ON api_key_model_affinity (updated_at);\n"
        "ALTER TABLE api_keys ADD CONSTRAINT api_keys_name_short CHECK (length(name) < 500)"
        " NOT VALID;\n"
        "ALTER TABLE api_keys VALIDATE CONSTRAINT api_keys_name_short;\n"
    )
    work = _with_extra(tmp_path, name, sql)
    caplog.set_level(logging.WARNING, logger="affinity_node.store.migrate")
    holder = await asyncpg.connect(dsn)
    key = await new_key(holder, "holder")
    tx = holder.transaction()
    await tx.start()
    await holder.execute(
        "INSERT INTO api_key_model_affinity (api_key_id, model, provider_url, version, "
        "expires_at) VALUES ($1, 'held', 'http://b:1', 0, now() + interval '1 hour')",
        key,
    )
    task = asyncio.create_task(migrate(dsn, work, FAST))
    try:
        await wait_for(lambda: _waits(caplog, name) >= 2, 10, "the index build to wait twice")
        took = await _binding_writes(dsn, WRITES)
        assert max(took) < 1.0, took
        assert not task.done()
    finally:
        await tx.commit()
        await holder.close()
    assert await asyncio.wait_for(task, 10) == [name]
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c "
            "ON c.oid = i.indexrelid WHERE c.relname = 'api_key_model_affinity_updated_idx'"
        )
        assert [tuple(r) for r in rows] == [("api_key_model_affinity_updated_idx", True)]
        assert await conn.fetchval(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'api_keys_name_short'"
        )
    finally:
        await conn.close()


async def test_giving_up_names_the_cause_and_applies_nothing(dsn: str, tmp_path: Path) -> None:
    name = "0999_alter_bindings.sql"
    work = _with_extra(tmp_path, name, "ALTER TABLE api_key_model_affinity ADD COLUMN note text;\n")
    holder = await asyncpg.connect(dsn)
    tx = holder.transaction()
    await tx.start()
    await holder.fetchval("SELECT count(*) FROM api_key_model_affinity")
    try:
        from affinity_node.store.migrate import MigrationError

        few = LockPolicy(lock_timeout_ms=50, attempts=3, backoff_s=0.01, backoff_max_s=0.02)
        with pytest.raises(MigrationError, match="lock stayed busy"):
            await migrate(dsn, work, few)
    finally:
        await tx.rollback()
        await holder.close()
    conn = await asyncpg.connect(dsn)
    try:
        assert not await conn.fetchval(
            "SELECT count(*) FROM affinity_schema_migrations WHERE name = $1", name
        )
    finally:
        await conn.close()
