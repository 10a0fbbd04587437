"""deploy/postgres/roles.sql on a real Postgres: the migration role migrates, the serving role
runs a whole node (keys, misses, hits, rebinds, refreshes, purges) and can run no DDL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from affinity_node.app import postgres_bindings
from affinity_node.store.keys import create_key, revoke_key
from affinity_node.store.migrate import migrate
from tests.support.cluster import MODEL, cluster
from tests.support.waiting import wait_for

ROLES_SQL = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "roles.sql"
PASSWORD = "roles-test-password"
MESSAGES = [{"role": "user", "content": "hello"}]


def as_role(dsn: str, role: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:{quote(PASSWORD)}@{host}"))


async def test_the_serving_role_runs_a_node_and_cannot_change_the_schema(empty_dsn):
    admin = await asyncpg.connect(empty_dsn)
    try:
        for _ in range(2):  # safe to run again
            await admin.execute(ROLES_SQL.read_text(encoding="utf-8"))
        for role in ("affinity_migrator", "affinity_node"):
            await admin.execute(f"ALTER ROLE {role} PASSWORD '{PASSWORD}'")
    finally:
        await admin.close()
    node_dsn = as_role(empty_dsn, "affinity_node")
    migrator_dsn = as_role(empty_dsn, "affinity_migrator")

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await migrate(node_dsn)
    assert await migrate(migrator_dsn)
    assert await migrate(migrator_dsn) == []

    conn = await asyncpg.connect(node_dsn)
    try:
        for ddl in (
            "CREATE TABLE sneaky (a int)",
            "ALTER TABLE api_keys ADD COLUMN sneaky int",
            "CREATE INDEX sneaky ON api_key_model_affinity (model)",
            "DROP TABLE api_key_model_affinity",
            "TRUNCATE api_keys",
            "DROP TRIGGER affinity_binding_notify_v3 ON api_key_model_affinity",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(ddl)
        doomed, _ = await create_key(conn, "doomed")
        assert await revoke_key(conn, doomed.id)
    finally:
        await conn.close()

    async with cluster(node_dsn, nodes=2, backends=2) as c:
        secret = await c.new_key("tenant")
        first = await c.client(0, secret).chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES
        )
        assert first.headers["x-affinity"] == "miss"  # INSERT, trigger, sequence, NOTIFY
        await wait_for(lambda: len(c.nodes[1].engine.cache) == 1, what="NOTIFY reached node 1")
        again = await c.client(1, secret).chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES
        )
        assert again.headers["x-affinity"] == "hit"
        bound = c.backends[int(first.headers["x-backend-id"][1:])]
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{bound.url}/admin/fail", json={"status": 503}) as r,
        ):
            assert r.status == 200
        bound_id = f"http://127.0.0.1:{bound.port}"

        def ejected() -> bool:
            backend = c.nodes[0].backends.get(bound_id)
            return backend is not None and not backend.healthy

        await wait_for(ejected, timeout=10, what="the bound backend ejected")
        moved = await c.client(0, secret).chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES
        )
        assert moved.headers["x-affinity"] == "rebind"  # the compare-and-set UPDATE

    pool = await asyncpg.create_pool(node_dsn, min_size=0, max_size=2)
    try:
        assert await postgres_bindings(pool).purge(None, None) == 1  # DELETE
    finally:
        await pool.close()
