"""Apply db/migrations in order, once, even when every node runs `migrate` at the same time,
and without stopping binding writes fleet-wide while a file waits for a lock.

A file runs in one transaction unless its first line is `-- affinity: no-transaction` (then
statement by statement: `CREATE INDEX CONCURRENTLY`, `VALIDATE CONSTRAINT` in its own short
transaction). Every lock wait is bounded by `lock_timeout`: a DDL statement queued behind a
long reader would otherwise queue every later binding write behind itself. A wait that times
out is logged, backed off and retried (the whole file when it is transactional, the statement
when it is not), until `attempts` run out.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from affinity_node.store.lockkeys import MIGRATE_LOCK
from affinity_node.store.queries import QUERIES as Q

log = logging.getLogger(__name__)

NO_TRANSACTION = "-- affinity: no-transaction"
"""First line of a file whose statements must run outside a transaction block."""

_CONCURRENT_INDEX = re.compile(
    r"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)",
    re.IGNORECASE,
)


class MigrationError(RuntimeError):
    """A migration file differs from the one already applied, or failed to apply."""


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def transactional(self) -> bool:
        first = self.sql.lstrip().split("\n", 1)[0].strip()
        return first.lower() != NO_TRANSACTION

    @property
    def number(self) -> int:
        return int(self.name.split("_", 1)[0])


@dataclass(frozen=True, slots=True)
class LockPolicy:
    """How long one statement may wait for a lock, and how often a wait is retried."""

    lock_timeout_ms: int = 2000
    attempts: int = 30
    backoff_s: float = 0.5
    backoff_max_s: float = 10.0

    def pause(self, attempt: int) -> float:
        """Exponential, jittered: many nodes migrating at once do not retry in step."""
        base: float = min(self.backoff_s * 2.0 ** (attempt - 1), self.backoff_max_s)
        return base * random.uniform(0.5, 1.0)


def migrations_dir() -> Path:
    """The wheel ships the files inside the package; a source checkout reads db/ directly."""
    packaged = resources.files("affinity_node.store").joinpath("migrations")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "db" / "migrations"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    files = sorted(directory.glob("*.sql"))
    if not files:
        raise MigrationError(f"no migration files in {directory}")
    return [Migration(f.name, f.read_text(encoding="utf-8")) for f in files]


def required_migrations(directory: Path | None = None) -> frozenset[str]:
    """Every file this code ships: the schema it needs (it may run on a newer one)."""
    return frozenset(m.name for m in load_migrations(directory))


def split_statements(sql: str) -> list[str]:
    """Top-level statements of a file (quotes, dollar quotes and comments respected)."""
    out: list[str] = []
    start = i = 0
    n = len(sql)
    while i < n:
        c = sql[i]
        if sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c in "'\"":
            j = sql.find(c, i + 1)
            i = n if j < 0 else j + 1
        elif c == "$" and (m := re.match(r"\$[A-Za-z_]*\$", sql[i:])):
            j = sql.find(m.group(0), i + len(m.group(0)))
            i = n if j < 0 else j + len(m.group(0))
        elif c == ";":
            out.append(sql[start:i])
            i = start = i + 1
        else:
            i += 1
    out.append(sql[start:])
    return [s.strip() for s in out if _has_code(s)]


def _without_comments(statement: str) -> str:
    """A statement without its leading comment lines (split_statements keeps them)."""
    lines = statement.splitlines()
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("--")):
        lines.pop(0)
    return "\n".join(lines)


def _has_code(statement: str) -> bool:
    return any(ln.strip() and not ln.strip().startswith("--") for ln in statement.splitlines())


async def migrate(
    dsn: str, directory: Path | None = None, policy: LockPolicy | None = None
) -> list[str]:
    """Apply pending migrations; returns the names applied by this call.

    A session advisory lock serialises concurrent callers, so ten nodes starting at once apply
    each file exactly once; the later ones find the ledger complete and return [].
    """
    wanted = load_migrations(directory)
    policy = policy or LockPolicy()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(Q["migrate_lock"], MIGRATE_LOCK)
        try:
            await conn.execute(Q["migrations_ledger"])
            rows = await conn.fetch(Q["migrations_applied"])
            applied = {r["name"]: r["checksum"] for r in rows}
            done: list[str] = []
            for m in wanted:
                if m.name in applied:
                    if applied[m.name] != m.checksum:
                        raise MigrationError(
                            f"migration {m.name} was changed after it was applied; "
                            "add a new migration instead of editing an applied one"
                        )
                    continue
                if m.transactional:
                    await _apply_in_transaction(conn, m, policy)
                else:
                    await _apply_outside_transaction(conn, m, policy)
                log.info("applied migration %s", m.name)
                done.append(m.name)
            return done
        finally:
            await conn.execute(Q["migrate_unlock"], MIGRATE_LOCK)
    finally:
        await conn.close()


async def _apply_in_transaction(conn: asyncpg.Connection, m: Migration, p: LockPolicy) -> None:
    """The whole file or nothing; a lock wait past the timeout rolls it back and retries it."""
    for attempt in range(1, p.attempts + 1):
        try:
            async with conn.transaction():
                await conn.execute(Q["migrate_lock_timeout_local"], str(p.lock_timeout_ms))
                await conn.execute(m.sql)
                await conn.execute(Q["migration_record"], m.name, m.checksum)
            return
        except asyncpg.LockNotAvailableError:
            await _waited(m.name, attempt, p)


async def _apply_outside_transaction(conn: asyncpg.Connection, m: Migration, p: LockPolicy) -> None:
    """Statement by statement (each must be safe to run again: a crash reruns the file)."""
    await conn.execute(Q["migrate_lock_timeout"], str(p.lock_timeout_ms))
    try:
        for statement in split_statements(m.sql):
            await _run_statement(conn, m.name, statement, p)
        await conn.execute(Q["migration_record"], m.name, m.checksum)
    finally:
        await conn.execute(Q["migrate_lock_timeout_reset"])


async def _run_statement(
    conn: asyncpg.Connection, name: str, statement: str, p: LockPolicy
) -> None:
    index = _CONCURRENT_INDEX.match(_without_comments(statement))
    for attempt in range(1, p.attempts + 1):
        try:
            if index is not None:
                # A CONCURRENTLY build that failed leaves an invalid index behind; IF NOT
                # EXISTS would then keep it. Drop it first (without blocking writes, too).
                await _drop_invalid_index(conn, index.group("name"))
            await conn.execute(statement)
            return
        except asyncpg.LockNotAvailableError:
            await _waited(name, attempt, p)


async def _drop_invalid_index(conn: asyncpg.Connection, index: str) -> None:
    if await conn.fetchval(Q["migrate_index_invalid"], index):
        log.warning("dropping the invalid index %s left by an interrupted build", index)
        await conn.execute(Q["migrate_drop_index"].format(index=_quote_ident(index)))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _waited(name: str, attempt: int, p: LockPolicy) -> None:
    """Log the wait, then back off; the last attempt's failure ends the migration."""
    if attempt >= p.attempts:
        raise MigrationError(
            f"migration {name}: a lock stayed busy through {p.attempts} waits of "
            f"{p.lock_timeout_ms} ms; find the long transaction (pg_stat_activity) and rerun"
        )
    pause = p.pause(attempt)
    log.warning(
        "migration %s waited %d ms for a lock (attempt %d of %d); retrying in %.1f s",
        name,
        p.lock_timeout_ms,
        attempt,
        p.attempts,
        pause,
    )
    await asyncio.sleep(pause)
