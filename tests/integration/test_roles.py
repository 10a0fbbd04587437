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
from tests.integration.test_cli import cli
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


async def _roles(dsn: str, *roles: str) -> None:
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(ROLES_SQL.read_text(encoding="utf-8"))
        for role in roles:
            await admin.execute(f"ALTER ROLE {role} PASSWORD '{PASSWORD}'")
    finally:
        await admin.close()


REGISTRY_ADD = "INSERT INTO affinity_backends (url, added) VALUES ('http://10.9.9.9:8000', true)"


async def test_only_the_admin_role_writes_the_backend_registry(empty_dsn):
    # roles.sql before the migrations (default privileges would give the serving role the
    # registry; migration 0006 takes it back) ...
    await _roles(empty_dsn, "affinity_migrator", "affinity_node", "affinity_admin")
    assert await migrate(as_role(empty_dsn, "affinity_migrator"))
    node = await asyncpg.connect(as_role(empty_dsn, "affinity_node"))
    admin = await asyncpg.connect(as_role(empty_dsn, "affinity_admin"))
    try:
        for sql in (
            REGISTRY_ADD,
            "UPDATE affinity_backends SET state = 'disabled'",
            "DELETE FROM affinity_backends",
            "TRUNCATE affinity_backends",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await node.execute(sql)
        await admin.execute(REGISTRY_ADD)
        assert await node.fetchval("SELECT count(*) FROM affinity_backends") == 1  # it reads
        # What the node writes itself still works: its health reports, the mover's slot.
        await node.execute(
            "INSERT INTO affinity_backend_health (node_id, url, healthy, kind, models)"
            " VALUES ('n', 'http://10.9.9.9:8000', true, 'vllm', '{}')"
        )
        await node.execute("UPDATE affinity_mover SET last_move_at = now()")
        # ... and roles.sql run again after the migrations keeps it that way.
        await _roles(empty_dsn)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await node.execute(REGISTRY_ADD.replace("10.9.9.9", "10.9.9.8"))
    finally:
        await node.close()
        await admin.close()

    code, _, err = await cli(
        "backends", "add", "http://10.9.9.7:8000", dsn=as_role(empty_dsn, "affinity_node")
    )
    assert code == 1 and "admin" in err and "Traceback" not in err
    code, _, err = await cli(
        "backends", "drain", "http://10.9.9.9:8000", dsn=as_role(empty_dsn, "affinity_admin")
    )
    assert code == 0, err


async def test_a_reader_idle_in_a_transaction_is_ended_by_postgres(empty_dsn):
    await _roles(empty_dsn, "affinity_reader")
    admin = await asyncpg.connect(empty_dsn)
    try:
        settings = await admin.fetchval(
            "SELECT setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole"
            " WHERE r.rolname = 'affinity_reader' AND s.setdatabase = 0"
        )
        assert "idle_in_transaction_session_timeout=30s" in settings
        # The same mechanism, with a timeout a test can wait for.
        await admin.execute(
            "ALTER ROLE affinity_reader SET idle_in_transaction_session_timeout = '300ms'"
        )
        reader = await asyncpg.connect(as_role(empty_dsn, "affinity_reader"))
        try:
            await reader.execute("LISTEN affinity_changes")  # the worst case: it holds the queue
            await reader.execute("BEGIN")
            await reader.fetchval("SELECT 1")
            pid = reader.get_server_pid()

            async def ended() -> bool:
                return not await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
                )

            await wait_for(ended, timeout=10, interval=0.05, what="Postgres to end the session")
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await reader.fetchval("SELECT 1")
        finally:
            await reader.close(timeout=2)
    finally:
        await admin.execute(
            "ALTER ROLE affinity_reader SET idle_in_transaction_session_timeout = '30s'"
        )
        await admin.close()
