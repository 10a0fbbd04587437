"""The pool through a real PgBouncer in transaction mode, LISTEN direct (database.listen_dsn),
asyncpg's statement cache off (database.statement_cache: false): misses create bindings through
PgBouncer, every node learns them by NOTIFY, a revocation reaches every node, and no request is
served degraded."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import openai
import pytest

from affinity_node.config import NodeConfig
from affinity_node.sim.pgpair import service_tmpdir, service_user
from affinity_node.sim.support import free_port
from affinity_node.store.keys import revoke_key
from tests.support.cluster import MODEL, Cluster, cluster, knows
from tests.support.tools import require_tool
from tests.support.waiting import wait_for


def _upstream(dsn: str) -> tuple[str, int, str]:
    """(host or socket directory, port, database) of the test database's DSN."""
    parts = urlsplit(dsn)
    host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
    return host, parts.port or 5432, parts.path.lstrip("/")


@pytest.fixture
def bouncer(dsn: str) -> Iterator[str]:
    """A PgBouncer (transaction pooling) in front of the test database; its DSN."""
    binary = require_tool("pgbouncer", "apt-get install pgbouncer")
    host, port, database = _upstream(dsn)
    user = urlsplit(dsn).username or "postgres"
    with service_tmpdir("affinity-pgbouncer-") as work:  # PgBouncer refuses to run as root
        yield from _run_bouncer(binary, work, f"host={host} port={port} dbname={database}", user)


def _run_bouncer(binary: str, work: Path, upstream: str, user: str) -> Iterator[str]:
    database = upstream.rpartition("dbname=")[2]
    listen = free_port()
    (work / "users.txt").write_text(f'"{user}" ""\n')
    ini = work / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n{database} = {upstream}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {work / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 4\nmax_client_conn = 100\n"
        f"logfile = {work / 'pgbouncer.log'}\npidfile = {work / 'pgbouncer.pid'}\n"
    )
    proc = subprocess.Popen([binary, str(ini)], user=service_user(), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _accepts(listen):  # a child process: no event loop to wait on here
            assert proc.poll() is None, f"PgBouncer exited: {_log(work)}"
            assert time.monotonic() < deadline, "PgBouncer did not listen within 10 s"
            time.sleep(0.02)
        yield f"postgresql://{user}@127.0.0.1:{listen}/{database}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _log(work: Path) -> str:
    path = work / "pgbouncer.log"
    return path.read_text()[-2000:] if path.exists() else "(no log)"


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
async def fleet(dsn: str, bouncer: str) -> AsyncIterator[Cluster]:
    def through_bouncer(cfg: NodeConfig) -> None:
        cfg.database.listen_dsn = dsn
        cfg.database.statement_cache = False

    async with cluster(dsn, nodes=2, backends=3, node_dsn=bouncer, configure=through_bouncer) as c:
        yield c


async def test_pool_through_pgbouncer_listen_direct(fleet: Cluster, bouncer: str) -> None:
    outcomes: dict[str, list[tuple[str, str]]] = {}
    for k in range(6):
        secret = await fleet.new_key(f"tenant-{k}")
        pair = (fleet.key_ids[f"tenant-{k}"], MODEL)
        for n in (0, 1, 0, 1):  # a miss on node 0, then hits everywhere
            raw = await fleet.client(n, secret).chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=2
            )
            outcomes.setdefault(secret, []).append(
                (raw.headers["x-backend-id"], raw.headers["x-affinity"])
            )
            await wait_for(  # node 1 hears of the new binding by NOTIFY, not by a read
                lambda pair=pair: all(pair in dict(n.engine.cache.items()) for n in fleet.nodes),
                5.0,
                "the binding cached on both nodes",
            )
    for seen in outcomes.values():
        assert len({backend for backend, _ in seen}) == 1, seen
        assert [outcome for _, outcome in seen] == ["miss", "hit", "hit", "hit"], seen

    # The bindings are in the table (written through PgBouncer), one per pair.
    conn = await asyncpg.connect(bouncer, statement_cache_size=0)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM api_key_model_affinity")
        assert rows == len(outcomes)
        assert await revoke_key(conn, fleet.key_ids["tenant-0"])
    finally:
        await conn.close()
    secret = next(iter(outcomes))

    async def refused() -> bool:
        return not any([await knows(node, secret) for node in fleet.nodes])

    await wait_for(refused, 1.0, "the revocation on both nodes (NOTIFY, LISTEN direct)")
    with pytest.raises(openai.AuthenticationError):
        await fleet.client(1, secret).models.list()
