"""A database failover under traffic: a primary and its streaming standby on loopback, three
nodes on a multi-host DSN (old primary first) with target_session_attrs=read-write; the primary
crashes, the standby is promoted. No request that could be served fails; every node's pool and
listener land on the new primary; bindings converge to one backend per pair on every node; a
key revoked after the promotion is refused within 1 s everywhere."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import asyncpg
import openai
import pytest

from affinity_node.sim.pgpair import (
    PgPair,
    create_database,
    pg_pair,
    replicated,
    sessions_by_app,
)
from affinity_node.store.keys import revoke_key
from affinity_node.store.migrate import migrate
from tests.support.cluster import MODEL, Cluster, cluster, knows
from tests.support.waiting import wait_for

NODES = 3


@dataclass
class Traffic:
    """Requests from every key to every node, in a loop, until stopped."""

    statuses: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, client: openai.AsyncOpenAI, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"turn {i} of worker {n}"}],
                    max_tokens=4,
                )
                self.statuses[raw.headers["x-affinity"]] += 1
            except openai.APIError as exc:
                self.errors.append(repr(exc))


@pytest.fixture
def pair() -> Iterator[PgPair]:
    with pg_pair() as started:
        yield started


async def nodes_on(dsn: str, ids: list[str]) -> bool:
    """Every node's pool and listener hold a session on the server `dsn` reaches."""
    try:
        apps = await sessions_by_app(dsn)
    except (OSError, asyncpg.PostgresError):
        return False
    wanted = [f"affinity-node:{i}" for i in ids] + [f"affinity-node-listener:{i}" for i in ids]
    return all(apps.get(name, 0) > 0 for name in wanted)


async def caches_agree(fleet: Cluster, dsn: str) -> bool:
    """Every pair in the table is cached with the table's backend on every node."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT api_key_id, model, provider_url FROM api_key_model_affinity"
        )
    finally:
        await conn.close()
    table = {(r[0], r[1]): r[2] for r in rows}
    for node in fleet.nodes:
        cached = {p: e.backend for p, e in node.engine.cache.items()}
        if any(cached.get(p) != url for p, url in table.items()):
            return False
    return bool(table)


async def backend_seen(client: openai.AsyncOpenAI) -> tuple[str, str]:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "where"}], max_tokens=2
    )
    return raw.headers["x-backend-id"], raw.headers["x-affinity"]


async def test_fleet_follows_a_promoted_standby(pair: PgPair) -> None:
    dsn = await create_database(pair, f"failover_{uuid.uuid4().hex[:8]}")
    await migrate(dsn)
    await replicated(pair)
    async with cluster(dsn, nodes=NODES, backends=3) as fleet:
        ids = [f"node-{i}" for i in range(NODES)]
        secrets = [await fleet.new_key(f"tenant-{k}") for k in range(4)]
        clients = [fleet.client(n, s) for n in range(NODES) for s in secrets]
        traffic = Traffic()
        workers = [asyncio.create_task(traffic.worker(c, i)) for i, c in enumerate(clients)]
        try:
            await wait_for(lambda: traffic.statuses.total() >= 40, 20, "traffic before")
            started = time.monotonic()
            await pair.failover()
            # New tenants during and after the promotion: their bindings are born on it.
            late = [await fleet.new_key(f"late-{k}") for k in range(2)]
            workers += [
                asyncio.create_task(traffic.worker(fleet.client(n, s), 100 + n))
                for n in range(NODES)
                for s in late
            ]
            await wait_for(lambda: nodes_on(dsn, ids), 30, "every pool and listener on it")
            await wait_for(lambda: caches_agree(fleet, dsn), 20, "caches equal the new table")
            converged = time.monotonic() - started
            before = traffic.statuses.total()
            await wait_for(lambda: traffic.statuses.total() >= before + 30, 20, "traffic after")
        finally:
            traffic.stop.set()
            await asyncio.gather(*workers)
        print(f"\nconverged {converged:.2f} s after the crash; {dict(traffic.statuses)}")
        assert traffic.errors == []
        assert traffic.statuses["degraded"] < traffic.statuses.total()
        assert converged < 30

        # One backend per pair, whichever node serves it, all from affinity (no degraded).
        for secret in secrets + late:
            seen = {await backend_seen(fleet.client(n, secret)) for n in range(NODES)}
            assert len({backend for backend, _ in seen}) == 1, seen
            assert {outcome for _, outcome in seen} <= {"hit", "miss"}, seen

        # A key revoked on the new primary is refused within 1 s on every node.
        conn = await asyncpg.connect(dsn)
        try:
            assert await revoke_key(conn, fleet.key_ids["tenant-0"])
        finally:
            await conn.close()

        async def refused_everywhere() -> bool:
            return not any([await knows(node, secrets[0]) for node in fleet.nodes])

        took = await wait_for(refused_everywhere, 1.0, "the revocation on every node")
        for n in range(NODES):
            with pytest.raises(openai.AuthenticationError):
                await backend_seen(fleet.client(n, secrets[0]))
        print(f"revocation refused everywhere after {took * 1000:.0f} ms")
