"""The ledger's statements on a real Postgres: a batch counts once however often it is sent,
concurrent writers add to shared rows without deadlock, a deleted key's rows are left out, the
cleanup keeps to its retention and to one node at a time, and the report's window and order."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import timedelta

import asyncpg
import pytest

from affinity_node.ledger.ports import COUNT_COLUMNS, LedgerRow
from affinity_node.store.ledger_store import PostgresLedgerStore, usage_report
from affinity_node.store.lockkeys import LEDGER_CLEANUP_LOCK
from tests.support.nodes import new_key


@pytest.fixture
async def pool(dsn: str):
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=10)
    yield pool
    await pool.close()


async def now_hour(db: asyncpg.Connection) -> int:
    hour: int = await db.fetchval("SELECT floor(extract(epoch FROM now()) / 3600)::bigint")
    return hour


def row(key: uuid.UUID, hour: int, backend: str = "http://b0", *counts: int) -> LedgerRow:
    values = list(counts) + [0] * (len(COUNT_COLUMNS) - len(counts))
    return (key, "m", backend, hour), values


async def totals(db: asyncpg.Connection) -> dict[str, int]:
    cols = ", ".join(f"coalesce(sum({c}), 0)::bigint AS {c}" for c in COUNT_COLUMNS)
    rec = await db.fetchrow(f"SELECT {cols} FROM usage_ledger")
    return dict(rec)


async def test_each_count_lands_in_its_column_and_a_batch_counts_once(db, pool):
    key = await new_key(db)
    hour = await now_hour(db)
    store = PostgresLedgerStore(pool)
    writer = uuid.uuid4()
    distinct = list(range(1, len(COUNT_COLUMNS) + 1))  # every column a different value
    batch = [((key, "m", "http://b0", hour), distinct)]
    assert await store.add(writer, "n1", 1, batch)
    assert not await store.add(writer, "n1", 1, batch)  # sent again: already claimed
    assert await totals(db) == dict(zip(COUNT_COLUMNS, distinct, strict=True))
    assert await store.add(writer, "n1", 3, batch)  # the next batch adds
    assert not await store.add(writer, "n1", 2, batch)  # a late, older one does not
    assert await store.add(uuid.uuid4(), "n2", 1, batch)  # another writer's own numbering
    assert (await totals(db))["requests"] == 3
    stored = await db.fetchrow("SELECT hour_start, model, backend FROM usage_ledger")
    assert stored["hour_start"].timestamp() == hour * 3600
    assert (stored["model"], stored["backend"]) == ("m", "http://b0")
    assert (
        await db.fetchval("SELECT last_seq FROM usage_ledger_writers WHERE writer = $1", writer)
        == 3
    )


async def test_concurrent_writers_add_to_shared_rows_without_deadlock(db, pool):
    keys = [await new_key(db, f"k{i}") for i in range(5)]
    hour = await now_hour(db)
    shared = [
        row(k, hour - h, f"http://b{b}", 1, 10, 5) for k in keys for h in range(3) for b in range(3)
    ]

    async def writer(n: int) -> None:
        store = PostgresLedgerStore(pool)
        rows = list(shared)
        random.Random(n).shuffle(rows)  # whatever order a node holds them in
        for seq in range(1, 6):
            assert await store.add(uuid.uuid4(), f"n{n}", seq, rows)

    await asyncio.gather(*(writer(n) for n in range(8)))
    t = await totals(db)
    assert t["requests"] == 8 * 5 * len(shared)
    assert t["prompt_tokens"] == 10 * t["requests"] and t["cached_tokens"] == 5 * t["requests"]


async def test_rows_of_a_deleted_key_are_left_out(db, pool):
    kept, gone = await new_key(db, "kept"), await new_key(db, "gone")
    await db.execute("DELETE FROM api_keys WHERE id = $1", gone)
    hour = await now_hour(db)
    store = PostgresLedgerStore(pool)
    assert await store.add(uuid.uuid4(), "n", 1, [row(kept, hour, "b", 2), row(gone, hour, "b", 3)])
    assert await db.fetch("SELECT api_key_id, requests FROM usage_ledger") == [(kept, 2)]
    await db.execute("DELETE FROM api_keys WHERE id = $1", kept)  # the history goes with it
    assert await db.fetchval("SELECT count(*) FROM usage_ledger") == 0


async def test_the_table_refuses_what_no_node_writes(db):
    key = await new_key(db)
    for bad in (
        "INSERT INTO usage_ledger (hour_start, api_key_id, model, backend) "
        "VALUES (now(), $1, 'm', 'b')",  # not the start of an hour
        "INSERT INTO usage_ledger (hour_start, api_key_id, model, backend) "
        "VALUES (date_trunc('hour', now()), $1, '', 'b')",
        "INSERT INTO usage_ledger (hour_start, api_key_id, model, backend, requests) "
        "VALUES (to_timestamp(3600), $1, 'm', 'b', -1)",
    ):
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute(bad, key)


async def test_cleanup_keeps_the_retention_and_one_cleaner_at_a_time(db, pool):
    key = await new_key(db)
    hour = await now_hour(db)
    store = PostgresLedgerStore(pool)
    old = [row(key, hour - 24 * d, f"http://b{b}", 1) for d in (40, 41, 42) for b in range(4)]
    recent = [row(key, hour - 24 * d, "http://b0", 1) for d in (0, 1, 29)]
    assert await store.add(uuid.uuid4(), "n", 1, old + recent)
    await db.execute(
        "INSERT INTO usage_ledger_writers (writer, node_id, last_seq, flushed_at) "
        "VALUES ($1, 'gone', 7, now() - interval '2 days')",
        uuid.uuid4(),
    )
    async with db.transaction():  # another node is cleaning
        assert await db.fetchval("SELECT pg_try_advisory_xact_lock($1)", LEDGER_CLEANUP_LOCK)
        assert await store.delete_expired(30 * 86400, 5) is None
    assert await store.delete_expired(30 * 86400, 5) == 5
    assert await store.delete_expired(30 * 86400, 100) == 7
    assert await store.delete_expired(30 * 86400, 100) == 0
    left = await db.fetch("SELECT hour_start FROM usage_ledger ORDER BY hour_start")
    assert [int(r[0].timestamp()) // 3600 for r in left] == sorted(k[3] for k, _ in recent)
    assert await db.fetchval("SELECT count(*) FROM usage_ledger_writers") == 1  # ours only


async def test_the_report_window_filters_and_order(db, pool):
    a, b, c = [await new_key(db, n) for n in ("team-a", "team-b", "team-b")]
    hour = await now_hour(db)
    store = PostgresLedgerStore(pool)
    requests_prompt_cached = {a: (10, 1000, 900), b: (5, 1000, 100), c: (20, 400, 0)}
    rows = [
        row(k, hour, f"http://b{i}", r // 2, p // 2, x // 2)
        for k, (r, p, x) in requests_prompt_cached.items()
        for i in range(2)
    ]
    rows.append(row(a, hour - 48, "http://b9", 100, 100000, 0))  # two days ago
    assert await store.add(uuid.uuid4(), "n", 1, rows)

    day = await usage_report(db, timedelta(hours=24))
    # most lost cache (uncached prompt tokens) first: b 900, c 400, a 100
    assert [r["api_key_id"] for r in day] == [b, c, a]
    assert [r["prompt_tokens"] - r["cached_tokens"] for r in day] == [900, 400, 100]
    assert all(r["backends"] == ["http://b0", "http://b1"] for r in day)
    week = await usage_report(db, timedelta(days=7))
    assert week[0]["api_key_id"] == a and week[0]["backends"][-1] == "http://b9"
    by_name = await usage_report(db, timedelta(hours=24), key_name="team-b")
    assert {r["api_key_id"] for r in by_name} == {b, c}
    assert [r["api_key_id"] for r in await usage_report(db, timedelta(hours=24), a)] == [a]
    assert await usage_report(db, timedelta(hours=24), model="other") == []
    # a window starting inside an hour still includes that hour's bucket
    just_now = await usage_report(db, timedelta(seconds=1))
    assert {r["api_key_id"] for r in just_now} == {a, b, c}
