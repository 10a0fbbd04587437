"""The ledger's two readers on a ledger filled by real traffic: `affinity-node usage` (a
subprocess, as users run it) and every SQL query of the Tenants dashboard, macros expanded,
run as the dashboards' read-only role. The command and the dashboard's table agree."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from affinity_node.devtools import dashboards as d
from affinity_node.store.migrate import migrate
from affinity_node.vocabulary import LEDGER_OUTCOMES
from tests.integration.test_cli import cli
from tests.integration.test_ledger_e2e import Seen, ask, fast_ledger
from tests.integration.test_roles import PASSWORD, as_role
from tests.support.cluster import MODEL, Cluster, cluster
from tests.support.waiting import wait_for

ROLES_SQL = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "roles.sql"
TABLE = "Tenants losing the most cache"


async def usage_cli(dsn: str, *args: str) -> tuple[int, str, str]:
    return await cli("usage", *args, dsn=dsn)


async def fill(c: Cluster, dsn: str) -> dict[str, Seen]:
    """Three tenants: one whose prompts repeat (high hit rate), one whose prompts differ every
    time (low), one whose backend fails (a spill or a rebind)."""
    seen = {name: Seen() for name in ("steady", "scattered", "unlucky")}
    secrets = {name: await c.new_key(name) for name in seen}
    for turn in range(6):
        await ask(c.client(turn % 2, secrets["steady"]), seen["steady"], "chat", 0)
        scattered = c.client(turn % 2, secrets["scattered"])
        raw = await scattered.completions.with_raw_response.create(
            model=MODEL, prompt=f"{turn} " * 200 + "unrelated", max_tokens=4
        )
        seen["scattered"].requests += 1
        seen["scattered"].backends[raw.headers["x-backend-id"]] += 1
        await ask(c.client(turn % 2, secrets["unlucky"]), seen["unlucky"], "stream", 1)
    bound = seen["unlucky"].backends.most_common(1)[0][0]
    async with aiohttp.ClientSession() as http:
        url = c.backends[int(bound[1:])].url
        async with http.post(f"{url}/admin/fail", json={"status": 503}) as r:
            assert r.status == 200
        for turn in range(3):
            await ask(c.client(turn % 2, secrets["unlucky"]), seen["unlucky"], "stream", 1)
    total = sum(s.requests for s in seen.values())

    async def ledgered() -> bool:
        conn = await asyncpg.connect(dsn)
        try:
            return bool(await conn.fetchval("SELECT sum(requests) = $1 FROM usage_ledger", total))
        finally:
            await conn.close()

    await wait_for(ledgered, timeout=10, what="every request in the ledger")
    return seen


async def test_the_usage_command(dsn):
    async with cluster(dsn, nodes=2, backends=3, configure=fast_ledger) as c:
        seen = await fill(c, dsn)
        ids = {name: str(key) for name, key in c.key_ids.items()}
    code, out, err = await usage_cli(dsn, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["since_seconds"] == 86400
    rows = {t["key_name"]: t for t in doc["tenants"]}
    assert set(rows) == set(seen)
    lost = [t["uncached_tokens"] for t in doc["tenants"]]
    assert lost == sorted(lost, reverse=True) and doc["tenants"][0]["key_name"] == "scattered"
    for name, s in seen.items():
        t = rows[name]
        assert t["api_key_id"] == ids[name] and t["model"] == MODEL
        assert t["requests"] == s.requests == sum(t["outcomes"].values())
        assert set(t["outcomes"]) == set(LEDGER_OUTCOMES)
        assert t["uncached_tokens"] == t["prompt_tokens"] - t["cached_tokens"]
        assert len(t["backends"]) == len(s.backends)
    assert rows["steady"]["hit_rate"] > 0.6 > 0.2 > rows["scattered"]["hit_rate"]
    unlucky = rows["unlucky"]["outcomes"]
    assert unlucky["rebind"] + unlucky["spill"] >= 1 and len(rows["unlucky"]["backends"]) >= 2

    # one tenant, by name or by id; a model; a window
    for key in ("steady", ids["steady"]):
        code, out, _ = await usage_cli(dsn, "--json", "--key", key)
        assert [t["key_name"] for t in json.loads(out)["tenants"]] == ["steady"]
    code, out, _ = await usage_cli(dsn, "--json", "--model", "no-such-model")
    assert json.loads(out)["tenants"] == []
    code, out, _ = await usage_cli(dsn, "--json", "--since", "90m")
    assert len(json.loads(out)["tenants"]) == 3

    # the table people read
    code, out, _ = await usage_cli(dsn)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("usage in the last 1d")
    assert lines[2].startswith("scattered (") and lines[-1].startswith("all ")
    assert f"{rows['steady']['prompt_tokens']:,}" in out
    code, out, _ = await usage_cli(dsn, "--key", "nobody")
    assert code == 0 and out.strip() == "no usage recorded in the last 1d"
    code, _, err = await usage_cli(dsn, "--since", "soon")
    assert code == 2 and "duration" in err


def as_reader(dsn: str) -> str:
    return as_role(dsn, "affinity_reader")


@pytest.fixture
async def reader(dsn: str):
    """A connection as the dashboards' role, created by roles.sql after the migrations (the
    order an existing install takes; 0004 grants it itself when the role came first)."""
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(ROLES_SQL.read_text(encoding="utf-8"))
        await admin.execute(f"ALTER ROLE affinity_reader PASSWORD '{PASSWORD}'")
    finally:
        await admin.close()
    conn = await asyncpg.connect(as_reader(dsn))
    yield conn
    await conn.close()


async def run_board(
    conn: asyncpg.Connection, variables: dict[str, list[str] | None]
) -> dict[str, list[asyncpg.Record]]:
    """Every SQL query of the Tenants board over the last 24 hours, as Grafana would send it."""
    now = await conn.fetchval("SELECT now()")
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    start = (now - timedelta(hours=24)).strftime(fmt)
    results = {}
    for title, ref, _fmt, query in d.sql_queries(d.tenants()):
        sent = d.expand_sql(query, start, now.strftime(fmt), variables)
        assert "$" not in sent.replace("$__", ""), sent  # no variable left unexpanded
        results[f"{title} [{ref}]"] = await conn.fetch(sent)
    return results


def nonempty(results: dict[str, list[asyncpg.Record]]) -> list[str]:
    """The queries that returned no row, or only a row of nothing (a sum over no rows)."""
    return [
        name
        for name, rows in results.items()
        if not rows or all(v is None for r in rows for v in r.values())
    ]


async def test_every_dashboard_query_returns_rows_as_the_read_only_role(dsn, reader):
    async with cluster(dsn, nodes=2, backends=3, configure=fast_ledger) as c:
        await fill(c, dsn)
        steady = str(c.key_ids["steady"])
    everything = await run_board(reader, {"tenant": None, "model": None})
    assert nonempty(everything) == []
    assert len(everything) == 12  # 10 panels (one query each) and 2 variables
    one = await run_board(reader, {"tenant": [steady], "model": [MODEL]})
    assert nonempty(one) == []
    (row,) = one[f"{TABLE} [A]"]
    assert row["key_id"] == steady
    tenants = {r["__value"] for r in everything["tenant [variable]"]}
    assert tenants == {str(k) for k in c.key_ids.values()}
    # what the role may not do
    for forbidden in (
        "SELECT key_hash FROM api_keys",
        "SELECT * FROM api_key_model_affinity",
        "SELECT * FROM usage_ledger_writers",
        "DELETE FROM usage_ledger",
    ):
        with pytest.raises(
            (asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError)
        ):
            await reader.execute(forbidden)


def comparable(t: dict[str, Any]) -> tuple[Any, ...]:
    rate = None if t["hit rate"] is None else round(t["hit rate"], 9)
    return (
        t["key_id"],
        t["model"],
        t["requests"],
        t["prompt_tokens"],
        rate,
        t["lost_tokens"],
        t["backends"],
        t["rebinds"],
        t["spills"],
    )


async def test_the_dashboard_table_and_the_command_agree(dsn, reader):
    async with cluster(dsn, nodes=2, backends=3, configure=fast_ledger) as c:
        await fill(c, dsn)
    table = (await run_board(reader, {"tenant": None, "model": None}))[f"{TABLE} [A]"]
    code, out, err = await usage_cli(dsn, "--json", "--since", "24h")
    assert code == 0, err
    command = [
        {
            "key_id": t["api_key_id"],
            "model": t["model"],
            "requests": t["requests"],
            "prompt_tokens": t["prompt_tokens"],
            "hit rate": t["hit_rate"],
            "lost_tokens": t["uncached_tokens"],
            "backends": len(t["backends"]),
            "rebinds": t["outcomes"]["rebind"],
            "spills": t["outcomes"]["spill"],
        }
        for t in json.loads(out)["tenants"]
    ]
    assert len(command) == 3
    assert [comparable(t) for t in command] == [comparable(dict(r)) for r in table]


async def test_a_reader_role_made_before_the_migrations_is_granted_by_them(empty_dsn):
    admin = await asyncpg.connect(empty_dsn)
    try:
        await admin.execute(ROLES_SQL.read_text(encoding="utf-8"))  # no ledger table yet
        await admin.execute(f"ALTER ROLE affinity_reader PASSWORD '{PASSWORD}'")
    finally:
        await admin.close()
    await migrate(empty_dsn)
    conn = await asyncpg.connect(as_reader(empty_dsn))
    try:
        assert await conn.fetch("SELECT * FROM usage_ledger") == []
        assert await conn.fetch("SELECT id, name FROM api_keys") == []
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT key_hash FROM api_keys")
    finally:
        await conn.close()
