"""AFFINITY_DATABASE_DSN_FILE: the DSN is read again at every new connection, so a rotated
credential reaches the pool and the listener once their old connections are cut, without a
restart.

The test Postgres authenticates by trust (a changed password alone is not enforced there), so
the rotation here also moves to a new role and takes LOGIN from the old one: the old DSN then
stops working, as a rotated password does in production."""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import openai
import yaml

from affinity_node.app import run_node
from affinity_node.config import load_config
from affinity_node.sim.fake_backend import FakeBackendConfig, serve
from affinity_node.store.keys import create_key
from tests.integration.test_cli import cli
from tests.support.cluster import MODEL
from tests.support.postgres import unique_name
from tests.support.waiting import wait_for

MESSAGES = [{"role": "user", "content": "hello"}]


def as_role(dsn: str, role: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:{quote(password)}@{host}"))


async def _roles_connected(admin: asyncpg.Connection, role: str) -> set[str]:
    """The node's connections (pool: `affinity-node:`, listener: `affinity-node-listener:`)
    made as `role`, by kind."""
    rows = await admin.fetch(
        "SELECT application_name FROM pg_stat_activity WHERE usename = $1 AND datname = "
        "current_database()",
        role,
    )
    return {r[0].partition(":")[0] for r in rows}


async def test_a_rotated_dsn_file_is_read_again_when_connections_are_cut(dsn, tmp_path):
    old, new = unique_name("rot_old"), unique_name("rot_new")
    admin = await asyncpg.connect(dsn)
    backend = await serve(FakeBackendConfig(backend_id="b1", models=[MODEL]))
    try:
        for role, password in ((old, "first-password"), (new, "second-password")):
            await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE postgres")
        dsn_file = tmp_path / "dsn"
        dsn_file.write_text(as_role(dsn, old, "first-password") + "\n")
        _, secret = await create_key(admin, "before")
        (tmp_path / "node.yaml").write_text(
            yaml.safe_dump(
                {
                    "node_id": "dsn-file",
                    "listen": {"host": "127.0.0.1", "port": 0},
                    "backends": [{"url": backend.url, "models": [MODEL]}],
                    "models": [{"name": MODEL}],
                }
            )
        )
        cfg = load_config(tmp_path / "node.yaml", env={"AFFINITY_DATABASE_DSN_FILE": str(dsn_file)})
        async with run_node(cfg) as node:
            client = openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=secret, max_retries=0)
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            assert {"affinity-node", "affinity-node-listener"} <= await _roles_connected(admin, old)

            # Rotate: the file names the new credential, the old one stops working, and the
            # node's connections are cut.
            dsn_file.write_text(as_role(dsn, new, "second-password") + "\n")
            await admin.execute(f"ALTER ROLE {old} NOLOGIN PASSWORD NULL")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", old
            )

            # A key made now reaches the node only through its listener (the notification)
            # and its pool (the key's row is read): both must have reconnected as `new`.
            _, later = await create_key(admin, "after")
            fresh = openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=later, max_retries=0)

            async def served_with_new_key() -> bool:
                try:
                    await fresh.chat.completions.create(model=MODEL, messages=MESSAGES)
                except openai.AuthenticationError:
                    return False
                return True

            await wait_for(served_with_new_key, timeout=20, what="the key created after rotation")
            assert {"affinity-node", "affinity-node-listener"} <= await _roles_connected(admin, new)
            assert await _roles_connected(admin, old) == set()
            await client.close()
            await fresh.close()
    finally:
        await backend.close()
        for role in (old, new):
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
            )
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_commands_read_the_dsn_file_when_no_dsn_is_given(dsn, tmp_path):
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(dsn + "\n")
    env = {"AFFINITY_DATABASE_DSN": "", "AFFINITY_DATABASE_DSN_FILE": str(dsn_file)}
    code, out, err = await cli("keys", "create", "--name", "from-file", "--json", env=env)
    assert code == 0, err
    created = json.loads(out)
    conn = await asyncpg.connect(dsn)
    try:
        name = await conn.fetchval(
            "SELECT name FROM api_keys WHERE id = $1", uuid.UUID(created["id"])
        )
    finally:
        await conn.close()
    assert name == "from-file"
    env["AFFINITY_DATABASE_DSN_FILE"] = str(tmp_path / "absent")
    code, _, err = await cli("keys", "list", env=env)
    assert code != 0 and "cannot read" in err and "Traceback" not in err
