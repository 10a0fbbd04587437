"""Migrations: applied once, in order, safely from many processes; shipped in the wheel."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import zipfile
from pathlib import Path

import asyncpg
import pytest

from affinity_node.store.migrate import MigrationError, load_migrations, migrate, migrations_dir

ROOT = Path(__file__).resolve().parents[2]


async def test_ten_processes_migrating_at_once_apply_each_file_once(empty_dsn):
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "affinity_node",
            "migrate",
            "--dsn",
            empty_dsn,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(10)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 120)
    assert [p.returncode for p in procs] == [0] * 10, outputs
    files = load_migrations()
    applied_counts = [int(out.decode().split()[1]) for out, _ in outputs]
    assert sorted(applied_counts) == [0] * 9 + [len(files)]
    conn = await asyncpg.connect(empty_dsn)
    try:
        rows = await conn.fetch("SELECT name, checksum FROM affinity_schema_migrations")
        assert sorted(r["name"] for r in rows) == [f.name for f in files]
        assert {r["checksum"] for r in rows} == {f.checksum for f in files}
        tables = {
            r[0]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert {"api_keys", "api_key_model_affinity"} <= tables
    finally:
        await conn.close()


async def test_a_changed_applied_migration_is_refused(empty_dsn, tmp_path):
    work = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), work)
    assert len(await migrate(empty_dsn, work)) == len(load_migrations(work))
    assert await migrate(empty_dsn, work) == []
    first = sorted(work.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(empty_dsn, work)


async def test_schema_matches_the_contract(db):
    cols = await db.fetch(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = 'api_key_model_affinity' ORDER BY ordinal_position"
    )
    assert [c[0] for c in cols] == [
        "api_key_id",
        "model",
        "provider_url",
        "version",
        "created_at",
        "updated_at",
        "expires_at",
        "fanout_urls",  # a set's other members (0002)
    ]
    fk = await db.fetchval(
        "SELECT confdeltype FROM pg_constraint WHERE conrelid = 'api_key_model_affinity'::regclass "
        "AND contype = 'f'"
    )
    assert fk == b"c"  # ON DELETE CASCADE
    await db.execute("SET enable_seqscan = off")  # the table is empty: ask whether it *can*
    plan = await db.fetchval(
        "EXPLAIN (FORMAT JSON) SELECT * FROM api_key_model_affinity "
        "WHERE expires_at <= now() ORDER BY expires_at LIMIT 10"
    )
    assert "api_key_model_affinity_expires_at_idx" in plan


def test_wheel_ships_the_sql(tmp_path):
    hatchling_build = pytest.importorskip("hatchling.build")
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".mypy_cache"
        ),
    )
    out = tmp_path / "dist"
    out.mkdir()
    cwd = os.getcwd()
    os.chdir(src)
    try:
        name = hatchling_build.build_wheel(str(out))
    finally:
        os.chdir(cwd)
    names = zipfile.ZipFile(out / name).namelist()
    for f in load_migrations():
        assert f"affinity_node/store/migrations/{f.name}" in names
    assert "affinity_node/store/queries.sql" in names


async def test_a_notification_payload_stays_far_below_8000_bytes(db):
    """The largest row the constraints allow still notifies (Postgres refuses >= 8000)."""
    key = await db.fetchval(
        "INSERT INTO api_keys (id, name, key_hash) VALUES (gen_random_uuid(), 'k', $1) "
        "RETURNING id",
        b"x" * 32,
    )
    await db.execute("LISTEN affinity_changes")
    longest = "http://" + "h" * 2030 + ":8000"
    members = ["http://" + "m" * 180 + f"{i:02d}:8000" for i in range(15)]
    await db.execute(
        "INSERT INTO api_key_model_affinity (api_key_id, model, provider_url, version, "
        "expires_at, fanout_urls) VALUES ($1, $2, $3, 0, now() + interval '1 hour', $4)",
        key,
        "m" * 256,
        longest,
        members,
    )
    with pytest.raises(asyncpg.CheckViolationError):  # 16 members: past the bound
        await db.execute(
            "UPDATE api_key_model_affinity SET fanout_urls = fanout_urls || $1::text", "http://x:1"
        )
