"""`affinity-node backup` / `restore` on a live fleet: keys, registry and ledger come back as
they were; bindings (soft state) are emptied and every running node reloads in full, so no
node keeps serving a key or a binding the restore took away."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import asyncpg
import openai
import pytest

from affinity_node.http.state import ENGINE
from affinity_node.store.keys import create_key
from tests.integration.test_ops import MESSAGES, one_node
from tests.support.cluster import MODEL
from tests.support.waiting import wait_for


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "affinity_node",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _ledger_row(db: asyncpg.Connection, key: object, requests: int) -> None:
    await db.execute(
        "INSERT INTO usage_ledger (hour_start, api_key_id, model, backend, requests) "
        "VALUES (date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', $1, $2, "
        "'http://b:1', $3)",
        key,
        MODEL,
        requests,
    )


async def test_restore_brings_back_keys_registry_and_ledger_and_every_node_reloads(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    dump = tmp_path / "affinity.backup"
    async with one_node(dsn) as n:
        await n.client().chat.completions.create(model=MODEL, messages=MESSAGES)  # a binding
        engine = n.node.app[ENGINE]
        await wait_for(lambda: len(engine.cache) == 1, 5, "the node to cache its binding")
        old_key = (await db.fetchrow("SELECT id FROM api_keys"))[0]
        await _ledger_row(db, old_key, 7)
        await db.execute(
            "INSERT INTO affinity_backends (url, added, models) "
            "VALUES ('http://127.0.0.1:9', true, $1)",
            [MODEL],
        )
        code, out, err = await _cli("backup", "--dsn", dsn, "--out", str(dump))
        assert code == 0, err
        assert "api_keys 1" in out and "usage_ledger " in out and "affinity_backends 1" in out

        # After the backup: a new key (used: cached by the node), more usage, a registry change.
        new, new_secret = await create_key(db, "after-backup")
        await n.client(new_secret).chat.completions.create(model=MODEL, messages=MESSAGES)
        await wait_for(lambda: len(engine.cache) == 2, 5, "the new key's binding cached")
        await db.execute("UPDATE usage_ledger SET requests = 99")
        await db.execute("DELETE FROM affinity_backends")

        code, out, err = await _cli("restore", "--dsn", dsn, "--in", str(dump))
        assert code == 0, err

        async def refused() -> bool:
            try:
                await n.client(new_secret).chat.completions.create(model=MODEL, messages=MESSAGES)
            except openai.AuthenticationError:
                return True
            return False

        await wait_for(refused, 10, "the key made after the backup to be refused")
        # The node reloaded in full: the bindings the restore emptied are gone from its cache.
        await wait_for(lambda: len(engine.cache) == 0, 10, "the cache to match the empty table")
        assert engine.sync_status.as_dict()["mode"] == "full"
        # The backed-up key still works (and binds afresh).
        await n.client().chat.completions.create(model=MODEL, messages=MESSAGES)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM api_key_model_affinity WHERE api_key_id = $1", new.id
        )
        == 0
    )
    assert [
        tuple(r)
        for r in await db.fetch(
            "SELECT api_key_id, requests FROM usage_ledger WHERE backend = 'http://b:1'"
        )
    ] == [(old_key, 7)]
    assert await db.fetchval("SELECT array_agg(url) FROM affinity_backends") == [
        "http://127.0.0.1:9"
    ]


async def test_restore_refuses_a_database_without_the_backups_schema(
    dsn: str, empty_dsn: str, tmp_path: Path
) -> None:
    dump = tmp_path / "affinity.backup"
    assert (await _cli("backup", "--dsn", dsn, "--out", str(dump)))[0] == 0
    code, _, err = await _cli("restore", "--dsn", empty_dsn, "--in", str(dump))
    assert code == 1 and "run `affinity-node migrate` first" in err
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a zip")
    code, _, err = await _cli("restore", "--dsn", dsn, "--in", str(junk))
    assert code == 1 and "Traceback" not in err


@pytest.mark.parametrize("missing", ["--out"])
async def test_backup_needs_a_file(dsn: str, missing: str) -> None:
    code, _, err = await _cli("backup", "--dsn", dsn)
    assert code == 2 and missing in err
