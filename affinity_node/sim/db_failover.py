"""`demo --scenario db-failover`: a primary and its streaming standby on loopback
(sim/pgpair.py), N nodes on a multi-host DSN (old primary first, target_session_attrs=read-write),
fake backends, tenants sending chat requests in a loop. The primary crashes, the standby is
promoted; the report is a table per phase (requests, errors, degraded share) and the time until
every node's pool and listener are on the new primary and every cache equals its table, then
how long a key revoked on it takes to be refused everywhere.

The nodes and backends run in this process (the failover is the database's, not theirs)."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import IO

import aiohttp
import asyncpg

from affinity_node.app import RunningNode, run_node
from affinity_node.auth.keycache import InvalidKey, KeysUnavailable
from affinity_node.config import (
    BackendConfig,
    DatabaseConfig,
    HealthConfig,
    ListenConfig,
    ModelConfig,
    NodeConfig,
    validate,
)
from affinity_node.http.state import CONFIG
from affinity_node.sim.fake_backend import FakeBackendConfig, serve
from affinity_node.sim.pgpair import create_database, pg_pair, replicated, sessions_by_app
from affinity_node.store.keys import create_key, revoke_key
from affinity_node.store.migrate import migrate

MODEL = "llama-3.1-8b"
BEFORE_S = 3.0
"""Traffic before the crash."""
AFTER_S = 3.0
"""Traffic after convergence."""
CONVERGE_TIMEOUT_S = 30.0


@dataclass
class Phase:
    requests: int = 0
    errors: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


@dataclass
class Traffic:
    phases: dict[str, Phase] = field(default_factory=dict)
    phase: str = "before"
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, session: aiohttp.ClientSession, url: str, secret: str) -> None:
        turn = 0
        while not self.stop.is_set():
            turn += 1
            phase = self.phases.setdefault(self.phase, Phase())
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"turn {turn}"}],
                "max_tokens": 4,
            }
            try:
                async with session.post(
                    f"{url}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {secret}"},
                ) as r:
                    await r.read()
                    ok = r.status == 200
                    phase.outcomes[r.headers.get("x-affinity", "")] += 1
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            phase.requests += 1
            phase.errors += not ok
            if not ok:
                await asyncio.sleep(0.05)  # a failing node is not hammered


def node_config(dsn: str, backend_urls: list[str], node_id: str) -> NodeConfig:
    cfg = NodeConfig(
        node_id=node_id,
        listen=ListenConfig(host="127.0.0.1", port=0),
        database=DatabaseConfig(
            dsn=dsn, pool_max=4, statement_timeout_ms=1000, lock_timeout_ms=500
        ),
        health=HealthConfig(interval_seconds=1.0),
        backends=[BackendConfig(url=u, models=[MODEL]) for u in backend_urls],
        models=[ModelConfig(name=MODEL)],
    )
    cfg.ledger.enabled = False
    validate(cfg)
    return cfg


async def _on_primary(dsn: str, nodes: list[RunningNode]) -> bool:
    try:
        apps = await sessions_by_app(dsn)
    except (OSError, asyncpg.PostgresError):
        return False
    ids = [n.app[CONFIG].node_id for n in nodes]
    names = [f"affinity-node:{i}" for i in ids] + [f"affinity-node-listener:{i}" for i in ids]
    return all(apps.get(name, 0) > 0 for name in names)


async def _caches_agree(dsn: str, nodes: list[RunningNode]) -> bool:
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError):
        return False
    try:
        rows = await conn.fetch(
            "SELECT api_key_id, model, provider_url FROM api_key_model_affinity"
        )
    finally:
        await conn.close()
    table = {(r[0], r[1]): r[2] for r in rows}
    return bool(table) and all(
        dict((p, e.backend) for p, e in n.engine.cache.items()).get(p) == url
        for n in nodes
        for p, url in table.items()
    )


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> float | None:
    """Seconds until `check()` is true, or None at the deadline."""
    start = time.monotonic()
    for _ in range(int(timeout_s / 0.02)):
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    return None


async def _refused_everywhere(nodes: list[RunningNode], secret: str) -> bool:
    for node in nodes:
        try:
            await node.keys.authenticate(secret)
            return False
        except InvalidKey:
            continue
        except KeysUnavailable:
            return False
    return True


@dataclass
class Result:
    phases: dict[str, Phase]
    converge_s: float | None
    revoke_s: float | None


async def failover_run(
    n_nodes: int, n_backends: int, n_keys: int, say: Callable[[str], None]
) -> Result:
    """The whole scenario; every process and server it starts is stopped at the end."""
    with pg_pair() as pair:
        dsn = await create_database(pair, f"failover_{uuid.uuid4().hex[:8]}")
        await migrate(dsn)
        await replicated(pair)
        say(f"primary 127.0.0.1:{pair.primary.port}, standby 127.0.0.1:{pair.standby.port}")
        async with AsyncExitStack() as stack:
            fakes = [await serve(FakeBackendConfig(f"b{i}", [MODEL])) for i in range(n_backends)]
            for fake in fakes:
                stack.push_async_callback(fake.close)
            urls = [f.url for f in fakes]
            nodes = [
                await stack.enter_async_context(run_node(node_config(dsn, urls, f"node-{i}")))
                for i in range(n_nodes)
            ]
            conn = await asyncpg.connect(dsn)
            try:
                keys = [await create_key(conn, f"tenant-{k}") for k in range(n_keys)]
            finally:
                await conn.close()
            secrets = [secret for _, secret in keys]
            for secret in secrets:
                await _until(lambda s=secret: _known_everywhere(nodes, s), 10.0)  # type: ignore[misc]
            session = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            )
            traffic = Traffic()
            workers = [
                asyncio.create_task(traffic.worker(session, node.url, secret))
                for node in nodes
                for secret in secrets
            ]
            try:
                await asyncio.sleep(BEFORE_S)  # traffic, not synchronisation: the "before" phase
                say("crashing the primary, promoting the standby")
                traffic.phase = "during"
                started = time.monotonic()
                await pair.failover()
                everywhere = await _until(lambda: _on_primary(dsn, nodes), CONVERGE_TIMEOUT_S)
                agree = await _until(lambda: _caches_agree(dsn, nodes), CONVERGE_TIMEOUT_S)
                converge = (
                    time.monotonic() - started
                    if everywhere is not None and agree is not None
                    else None
                )
                traffic.phase = "after"
                await asyncio.sleep(AFTER_S)
            finally:
                traffic.stop.set()
                await asyncio.gather(*workers)
            conn = await asyncpg.connect(dsn)
            try:
                await revoke_key(conn, keys[0][0].id)
            finally:
                await conn.close()
            revoke = await _until(lambda: _refused_everywhere(nodes, secrets[0]), 5.0)
            return Result(traffic.phases, converge, revoke)


async def _known_everywhere(nodes: list[RunningNode], secret: str) -> bool:
    for node in nodes:
        try:
            await node.keys.authenticate(secret)
        except (InvalidKey, KeysUnavailable):
            return False
    return True


def render(result: Result, out: IO[str]) -> None:
    out.write(f"\n{'phase':<8} {'requests':>9} {'errors':>7} {'degraded':>9}\n")
    for name in ("before", "during", "after"):
        ph = result.phases.get(name, Phase())
        share = ph.outcomes["degraded"] / ph.requests if ph.requests else 0.0
        out.write(f"{name:<8} {ph.requests:>9} {ph.errors:>7} {100 * share:>8.1f}%\n")
    conv = "not reached" if result.converge_s is None else f"{result.converge_s:.2f} s"
    out.write(
        f"\ntime to converge (pools + listeners on the new primary, caches = table): {conv}\n"
    )
    rev = "not within 5 s" if result.revoke_s is None else f"{1000 * result.revoke_s:.0f} ms"
    out.write(f"a key revoked on the new primary is refused on every node after: {rev}\n")


async def run_db_failover(
    args: argparse.Namespace, out: IO[str], say: Callable[[str], None]
) -> int:
    """0 when no request failed, the fleet converged and the revocation reached every node."""
    result = await failover_run(args.nodes, args.backends, min(args.keys, 12), say)
    render(result, out)
    failed = sum(p.errors for p in result.phases.values())
    if failed or result.converge_s is None or result.revoke_s is None:
        say(f"{failed} request(s) failed" if failed else "the fleet did not converge")
        return 1
    return 0
