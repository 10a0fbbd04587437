"""The commands the README shows, run as a user runs them (subprocesses)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid

import asyncpg

from tests.support.nodes import BACKENDS, CountingChooser, nodes


async def cli(
    *args: str, dsn: str | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    full_env = {**os.environ, **(env or {})}
    if dsn is not None:
        full_env["AFFINITY_DATABASE_DSN"] = dsn
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "affinity_node",
        *args,
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_keys_create_list_revoke(dsn):
    code, out, _ = await cli("keys", "create", "--name", "team-a", "--json", dsn=dsn)
    assert code == 0
    created = json.loads(out)
    assert created["secret"].startswith("sk-") and created["name"] == "team-a"
    conn = await asyncpg.connect(dsn)
    try:
        stored = await conn.fetchval(
            "SELECT key_hash FROM api_keys WHERE id = $1::uuid", created["id"]
        )
        assert created["secret"].encode() not in bytes(stored)  # only the hash is stored
    finally:
        await conn.close()
    code, out, _ = await cli("keys", "create", "--name", "team-b", "--dsn", dsn)
    assert code == 0 and "secret:" in out

    code, out, _ = await cli("keys", "list", "--json", dsn=dsn)
    listed = json.loads(out)
    assert [k["name"] for k in listed] == ["team-a", "team-b"]
    assert all("secret" not in k for k in listed)
    code, out, _ = await cli("keys", "revoke", created["id"], dsn=dsn)
    assert code == 0
    code, out, _ = await cli("keys", "list", dsn=dsn)
    assert "revoked" in out and "active" in out
    code, _, err = await cli("keys", "revoke", created["id"], dsn=dsn)
    assert code == 1 and "no active key" in err


async def test_bindings_list_and_purge(dsn, db):
    ids = []
    for name in ("a", "b"):
        code, out, _ = await cli("keys", "create", "--name", name, "--json", dsn=dsn)
        ids.append(json.loads(out)["id"])
    async with nodes(dsn, 1) as (node,):
        for i in ids:
            for model in ("m1", "m2"):
                await node.engine.resolve(uuid.UUID(i), model, BACKENDS, CountingChooser())
    code, out, _ = await cli("bindings", "list", "--json", dsn=dsn)
    rows = json.loads(out)
    assert len(rows) == 4 and {r["model"] for r in rows} == {"m1", "m2"}
    code, out, _ = await cli("bindings", "list", "--model", "m1", "--json", dsn=dsn)
    assert len(json.loads(out)) == 2
    code, out, _ = await cli("bindings", "purge", "--api-key-id", ids[0], "--model", "m2", dsn=dsn)
    assert code == 0 and "purged 1" in out
    code, out, _ = await cli("bindings", "purge", "--model", "m1", dsn=dsn)
    assert "purged 2" in out
    assert await db.fetchval("SELECT count(*) FROM api_key_model_affinity") == 1


async def test_clear_errors_without_a_database_or_with_a_bad_config(tmp_path):
    code, _, err = await cli("migrate", env={"AFFINITY_DATABASE_DSN": ""})
    assert code != 0 and "AFFINITY_DATABASE_DSN" in err
    bad = tmp_path / "node.yaml"
    bad.write_text("listen: {port: eighty}\nbackends: [{url: 'http://127.0.0.1:1'}]\n")
    code, _, err = await cli("serve", "--config", str(bad), env={"AFFINITY_DATABASE_DSN": "x"})
    assert code == 2 and "listen.port" in err and "Traceback" not in err
    code, _, err = await cli("serve", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "cannot read config" in err


async def test_env_overrides_config(tmp_path):
    from affinity_node.config import load_config

    path = tmp_path / "node.yaml"
    path.write_text(
        "node_id: from-file\nlisten: {port: 8080}\n"
        "database: {dsn: postgresql://file/db}\n"
        "backends: [{url: 'http://127.0.0.1:1', models: [m]}]\n"
    )
    cfg = load_config(
        path,
        env={
            "AFFINITY_LISTEN_PORT": "9001",
            "AFFINITY_NODE_ID": "env",
            "AFFINITY_DATABASE_DSN": "postgresql://env/db",
            "AFFINITY_AFFINITY_STORE": "memory",
        },
    )
    assert (cfg.listen.port, cfg.node_id, cfg.database.dsn, cfg.affinity.store) == (
        9001,
        "env",
        "postgresql://env/db",
        "memory",
    )


async def test_keys_limits_create_update_and_the_database_checks(dsn):
    code, out, _ = await cli(
        "keys", "create", "--name", "lim", "--rpm", "600", "--tpm", "9000", "--json", dsn=dsn
    )
    assert code == 0
    created = json.loads(out)
    assert (created["rpm"], created["tpm"], created["max_concurrent"]) == (600, 9000, None)
    key = created["id"]
    code, out, _ = await cli("keys", "update", key, "--max-concurrent", "4", "--json", dsn=dsn)
    assert code == 0
    assert json.loads(out) == {
        "id": key,
        "rpm": 600,
        "tpm": 9000,
        "max_concurrent": 4,
        "priority": None,
    }
    code, out, _ = await cli("keys", "update", key, "--priority", "7", "--json", dsn=dsn)
    assert code == 0 and json.loads(out)["priority"] == 7 and json.loads(out)["rpm"] == 600
    code, _, err = await cli("keys", "update", key, "--priority", "10", dsn=dsn)
    assert code == 2 and "Traceback" not in err
    code, _, err = await cli("keys", "update", key, "--priority", "1", "--model", "m1", dsn=dsn)
    assert code == 2 and "without --model" in err
    code, out, _ = await cli("keys", "update", key, "--rpm", "30", "--model", "m1", dsn=dsn)
    assert code == 0 and "rpm=30" in out
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT model, rpm, tpm, max_concurrent, priority FROM api_key_limits "
            "WHERE api_key_id = $1::uuid ORDER BY model",
            key,
        )
        assert [tuple(r) for r in rows] == [("", 600, 9000, 4, 7), ("m1", 30, None, None, None)]
    finally:
        await conn.close()
    code, out, _ = await cli("keys", "update", key, "--rpm", "0", "--model", "m1", dsn=dsn)
    assert code == 0 and "none" in out  # every limit of that scope removed: its row goes
    code, _, err = await cli("keys", "update", key, "--rpm", "-1", dsn=dsn)
    assert code == 2 and "Traceback" not in err
    code, _, err = await cli("keys", "update", str(uuid.uuid4()), "--rpm", "5", dsn=dsn)
    assert code == 1 and "no active key" in err
    code, _, err = await cli("keys", "update", key, dsn=dsn)
    assert code == 2 and "nothing to change" in err
