"""The binding store on Postgres: an asyncpg pool running the statements of queries.sql."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from array import array
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast
from uuid import UUID

import asyncpg

from affinity_node.config import DsnSource
from affinity_node.routing.ports import (
    BindingRow,
    Changes,
    CreateResult,
    Members,
    Pair,
    RowTuple,
    SnapshotPage,
    StoredBinding,
    StoreUnavailable,
)
from affinity_node.store.lockkeys import CLEANUP_LOCK, binding_lock_key
from affinity_node.store.queries import QUERIES as Q
from affinity_node.vocabulary import DbOperation

log = logging.getLogger(__name__)

QueryLogger = Callable[[Any], None]

# Everything that means "the database cannot do this for us right now". Callers degrade.
DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


def is_outage(exc: BaseException) -> bool:
    """Connection trouble, a client timer or a statement timeout; not a busy lock (the lock
    timeout is shorter than the statement timeout, so a lock wait ends as LockNotAvailable)."""
    if not isinstance(exc, asyncpg.PostgresError):
        return True
    return isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.CannotConnectNowError
        | asyncpg.OperatorInterventionError
        | asyncpg.QueryCanceledError,
    )


@dataclass(frozen=True, slots=True)
class PoolSettings:
    dsn: DsnSource
    """A DSN, or a function called for every new connection (`database.dsn_file`)."""
    pool_max: int = 10
    statement_timeout_ms: int = 2000
    lock_timeout_ms: int = 1000
    connect_timeout_s: float = 2.0
    application_name: str = "affinity-node"
    statement_cache: bool = True
    """False behind a transaction pooler: no prepared-statement cache, and no session settings
    at connect (PgBouncer refuses unknown startup parameters; the role carries the timeouts)."""

    @property
    def server_settings(self) -> dict[str, str]:
        if not self.statement_cache:
            return {"application_name": self.application_name}
        return {
            "application_name": self.application_name,
            "statement_timeout": str(self.statement_timeout_ms),
            "lock_timeout": str(self.lock_timeout_ms),
            "idle_in_transaction_session_timeout": str(self.statement_timeout_ms * 5),
        }

    @property
    def client_timeout_s(self) -> float:
        """The client's own timer, above the server's timeouts: the server cancels first and
        says why (statement or lock), and the connection stays usable. The client timer only
        fires when the server cannot answer at all (a frozen host)."""
        server_ms = max(self.statement_timeout_ms, self.lock_timeout_ms)
        return (server_ms + max(500, server_ms // 4)) / 1000


POOL_CLOSE_S = 5.0


async def close_pool(db: asyncpg.Pool, timeout_s: float = POOL_CLOSE_S) -> None:
    """Closes the pool, bounded: a graceful close waits for every connection's goodbye, which a
    frozen or overloaded server may never send; past the bound the connections are cut. A
    node's shutdown must not fail on its database."""
    try:
        async with asyncio.timeout(timeout_s):
            await db.close()
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        log.warning("database pool did not close cleanly (%s): connections cut", type(exc).__name__)
        db.terminate()


async def create_pool(settings: PoolSettings, on_query: QueryLogger | None = None) -> asyncpg.Pool:
    """A lazy pool (no connection until first use), so a node starts while Postgres is down."""

    async def init(conn: asyncpg.Connection) -> None:
        if on_query is not None:
            conn.add_query_logger(on_query)

    async def keep_session(conn: asyncpg.Connection) -> None:
        """Nothing to undo: our statements never change session state (no SET, no LISTEN,
        only transaction-scoped locks), and asyncpg still rolls back an open transaction.
        The default reset would cost one more round trip on every release."""

    dsn = settings.dsn

    async def connect(*_args: object, **kwargs: Any) -> asyncpg.Connection:
        """Each new connection reads the DSN again (a rotated password needs no restart)."""
        assert callable(dsn)
        return await asyncpg.connect(dsn(), **kwargs)

    db: asyncpg.Pool = await asyncpg.create_pool(
        None if callable(dsn) else dsn,
        connect=connect if callable(dsn) else None,
        min_size=0,
        max_size=settings.pool_max,
        timeout=settings.connect_timeout_s,
        command_timeout=settings.client_timeout_s,
        max_inactive_connection_lifetime=60.0,
        init=init,
        reset=keep_session,
        statement_cache_size=100 if settings.statement_cache else 0,
        server_settings=settings.server_settings,
    )
    return db


def _binding(row: asyncpg.Record) -> StoredBinding:
    """(provider_url, version, ttl, fanout_urls), as every binding statement returns them."""
    return StoredBinding(row[0], row[1], row[2], tuple(row[3]))


_FIRST_KEY = (UUID(int=0), "")
"""Below every primary key: the first snapshot page starts after it."""


def _column(code: str, packed: bytes | None) -> array[Any]:
    """A column the database packed big-endian (uuid_send, int8send, float8send) as an array."""
    out: array[Any] = array(code)
    out.frombytes(packed or b"")
    if sys.byteorder == "little":
        out.byteswap()
    return out


class PostgresBindingStore:
    """Implements routing.ports.BindingStore. Every failure surfaces as StoreUnavailable."""

    def __init__(
        self, db: asyncpg.Pool, acquire_timeout_s: float = 0.5, snapshot_timeout_s: float = 30.0
    ) -> None:
        """`snapshot_timeout_s`: the deadline of one snapshot page (not the pool's statement
        timeout, which is the request path's)."""
        self._db = db
        self._acquire_timeout = acquire_timeout_s
        self._snapshot_timeout = snapshot_timeout_s
        self.rows_read = 0
        """Rows returned by snapshots and catch-ups (what a resync cost)."""

    @asynccontextmanager
    async def _conn(self, operation: DbOperation) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection. Waiting for a free one is bounded and is not an outage (the
        pool is busy); failing to connect is."""
        try:
            conn = await self._db.acquire(timeout=self._acquire_timeout)
        except TimeoutError as exc:
            raise StoreUnavailable(operation, exc, down=False) from exc
        except DB_ERRORS as exc:
            raise StoreUnavailable(operation, exc, down=is_outage(exc)) from exc
        try:
            yield conn
        except DB_ERRORS as exc:
            raise StoreUnavailable(operation, exc, down=is_outage(exc)) from exc
        finally:
            try:
                await self._db.release(conn)
            except DB_ERRORS as exc:  # a frozen server cannot even take the cancellation
                raise StoreUnavailable(operation, exc, down=True) from exc

    async def read(self, pair: Pair) -> StoredBinding | None:
        async with self._conn("read") as conn:
            row = await conn.fetchrow(Q["binding_read"], pair[0], pair[1])
        return None if row is None else _binding(row)

    async def create_if_absent(
        self, pair: Pair, choose: Callable[[], str], ttl: float
    ) -> CreateResult:
        # READ COMMITTED is required: each statement after the lock sees the winner's commit.
        # Under REPEATABLE READ the re-check would use the pre-lock snapshot and losers would fail.
        async with self._conn("create") as conn, conn.transaction(isolation="read_committed"):
            started = time.perf_counter()
            try:
                await conn.execute(Q["binding_lock"], binding_lock_key(*pair))
            except asyncpg.LockNotAvailableError as exc:  # another caller holds it too long
                waited = time.perf_counter() - started
                raise StoreUnavailable("create", exc, down=False, lock_wait=waited) from exc
            waited = time.perf_counter() - started
            row = await conn.fetchrow(Q["binding_read"], pair[0], pair[1])
            if row is not None:
                return CreateResult(_binding(row), False, waited)
            backend = choose()
            row = await conn.fetchrow(Q["binding_create"], pair[0], pair[1], backend, ttl)
            if row is None:  # a live row appeared without the lock (cannot happen via us)
                row = await conn.fetchrow(Q["binding_read"], pair[0], pair[1])
                if row is None:
                    raise StoreUnavailable("create", RuntimeError("binding vanished under lock"))
                return CreateResult(_binding(row), False, waited)
            return CreateResult(_binding(row), True, waited)

    async def rebind(self, pair: Pair, old: str, new: str, ttl: float) -> StoredBinding | None:
        async with self._conn("rebind") as conn:
            row = await conn.fetchrow(Q["binding_rebind"], pair[0], pair[1], old, new, ttl)
        return None if row is None else _binding(row)

    async def set_members(self, pair: Pair, version: int, fanout: Members) -> StoredBinding | None:
        async with self._conn("members") as conn, conn.transaction(isolation="read_committed"):
            try:
                await conn.execute(Q["binding_lock"], binding_lock_key(*pair))
            except asyncpg.LockNotAvailableError as exc:
                raise StoreUnavailable("members", exc, down=False) from exc
            row = await conn.fetchrow(
                Q["binding_set_members"], pair[0], pair[1], version, list(fanout)
            )
        return None if row is None else _binding(row)

    async def refresh(self, items: Sequence[tuple[Pair, str]], ttl: float) -> list[BindingRow]:
        if not items:
            return []
        ids = [p[0] for p, _ in items]
        models = [p[1] for p, _ in items]
        backends = [b for _, b in items]
        async with self._conn("refresh") as conn:
            rows = await conn.fetch(Q["binding_refresh"], ids, models, backends, ttl)
        return [BindingRow(r[0], r[1], r[2], r[3], r[4], tuple(r[5])) for r in rows]

    async def snapshot_page(self, after: Pair | None, limit: int) -> SnapshotPage:
        key, model = after or _FIRST_KEY
        timeout_ms = str(int(self._snapshot_timeout * 1000))
        async with self._conn("snapshot") as conn, conn.transaction(readonly=True):
            await conn.execute(Q["snapshot_statement_timeout"], timeout_ms)
            row = await conn.fetchrow(
                Q["binding_snapshot_page"], key, model, limit, timeout=self._snapshot_timeout + 1
            )
        assert row is not None  # an aggregate: one row, even for an empty page
        keys, models, backends, versions, ttls, sets = row
        page = SnapshotPage(
            _column("Q", keys),
            models or [],
            backends or [],
            _column("q", versions),
            _column("d", ttls),
            {(k.int, m): tuple(members) for k, m, members in sets or ()},
        )
        self.rows_read += page.rows
        return page

    async def changes_since(self, version: int, limit: int) -> Changes | None:
        # One snapshot for the horizon, the rows and the log: a trim or a change committing
        # between the statements cannot make them disagree.
        async with (
            self._conn("catchup") as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            horizon: int = await conn.fetchval(Q["binding_deletions_horizon"])
            if version < horizon:
                return None
            rows = await conn.fetch(Q["binding_changed_since"], version, limit + 1)
            self.rows_read += len(rows)
            if len(rows) > limit:
                return None
            deleted = await conn.fetch(Q["binding_deleted_since"], version, limit + 1)
            self.rows_read += len(deleted)
            if len(rows) + len(deleted) > limit:
                return None
        return Changes(cast(list[RowTuple], rows), [((r[0], r[1]), r[2]) for r in deleted])

    async def estimate_bindings(self) -> int:
        async with self._conn("snapshot") as conn:
            value: int = await conn.fetchval(Q["binding_estimate"])
        return value

    async def trim_deletions(self, older_than_s: float, batch: int) -> int | None:
        async with self._conn("cleanup") as conn, conn.transaction():
            if not await conn.fetchval(Q["binding_cleanup_lock"], CLEANUP_LOCK):
                return None
            trimmed: int = await conn.fetchval(Q["binding_deletions_trim"], older_than_s, batch)
        return trimmed

    async def delete_expired(self, batch: int) -> int | None:
        async with self._conn("cleanup") as conn, conn.transaction():
            if not await conn.fetchval(Q["binding_cleanup_lock"], CLEANUP_LOCK):
                return None
            status = await conn.execute(Q["binding_cleanup_batch"], batch)
        return int(status.split()[-1])

    async def ping(self) -> None:
        async with self._conn("ping") as conn:
            await conn.fetchval(Q["ping"])

    async def version_now(self) -> int:
        async with self._conn("snapshot") as conn:
            value: int = await conn.fetchval(Q["binding_version_now"])
        return value

    async def server_started_at(self) -> float:
        async with self._conn("snapshot") as conn:
            value: float = await conn.fetchval(Q["server_started_at"])
        return value

    async def list_bindings(
        self, model: str | None = None, api_key_id: UUID | None = None
    ) -> list[asyncpg.Record]:
        async with self._conn("list") as conn:
            rows: list[asyncpg.Record] = await conn.fetch(Q["binding_list"], model, api_key_id)
        return rows

    async def purge(self, model: str | None = None, api_key_id: UUID | None = None) -> int:
        async with self._conn("purge") as conn:
            status = await conn.execute(Q["binding_purge"], model, api_key_id)
        return int(status.split()[-1])
