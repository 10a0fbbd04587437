"""Apply db/migrations in order, once, even when every node runs `migrate` at the same time."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from affinity_node.store.lockkeys import MIGRATE_LOCK
from affinity_node.store.queries import QUERIES as Q

log = logging.getLogger(__name__)


class MigrationError(RuntimeError):
    """A migration file differs from the one already applied, or failed to apply."""


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


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


async def migrate(dsn: str, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; returns the names applied by this call.

    A session advisory lock serialises concurrent callers, so ten nodes starting at once apply
    each file exactly once; the later ones find the ledger complete and return [].
    """
    wanted = load_migrations(directory)
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
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(Q["migration_record"], m.name, m.checksum)
                log.info("applied migration %s", m.name)
                done.append(m.name)
            return done
        finally:
            await conn.execute(Q["migrate_unlock"], MIGRATE_LOCK)
    finally:
        await conn.close()
