"""affinity_notify_queue_usage on a real Postgres: a session that LISTENs and then sits in a
transaction holds the NOTIFY queue's tail while notifications flow, and the node's metric shows
the queue filling (issue 21); once the session lets go, the queue is trimmed again."""

from __future__ import annotations

import asyncpg

from affinity_node.store.notifyqueue import NotifyQueueMonitor
from tests.support.cluster import cluster
from tests.support.waiting import wait_for

PAYLOAD = "x" * 7000  # under the 8000-byte limit; about one queue page each


async def notify(conn: asyncpg.Connection, n: int) -> None:
    for _ in range(n):  # one transaction each: every commit appends to the queue
        await conn.execute("SELECT pg_notify('affinity_test_fill', $1)", PAYLOAD)


async def test_a_held_listener_transaction_makes_the_queue_usage_metric_rise(dsn):
    async with cluster(dsn, nodes=1, backends=1) as c:
        node = c.nodes[0]
        await wait_for(
            lambda: node.metrics_registry.get_sample_value("affinity_notify_queue_usage") == 0.0,
            what="the first reading (an empty queue)",
        )
        holder = await asyncpg.connect(dsn)
        writer = await asyncpg.connect(dsn)
        try:
            await holder.execute("LISTEN affinity_test_fill")
            await holder.execute("BEGIN")
            await holder.fetchval("SELECT 1")  # idle in transaction: reads nothing, holds the tail
            await notify(writer, 40)

            def usage() -> float:
                return node.metrics_registry.get_sample_value("affinity_notify_queue_usage") or 0.0

            await wait_for(lambda: usage() > 0, timeout=20, interval=0.1, what="usage above 0")
            held = usage()
            assert 0 < held < 1

            await holder.execute("ROLLBACK")  # it reads what it missed; the tail may move on
            await holder.fetchval("SELECT 1")
            monitor = NotifyQueueMonitor(writer)

            async def trimmed() -> bool:
                await notify(writer, 8)  # the queue is trimmed as writers cross pages
                value = await monitor.read_once()
                return value is not None and value < held

            await wait_for(trimmed, timeout=20, interval=0.1, what="the queue to be trimmed")
        finally:
            await holder.close()
            await writer.close()


async def test_the_monitor_reports_none_when_postgres_does_not_answer(dsn):
    conn = await asyncpg.connect(dsn)
    monitor = NotifyQueueMonitor(conn, timeout_s=1.0)
    assert await monitor.read_once() == 0.0
    await conn.close()
    assert await monitor.read_once() is None  # no stale value exported
