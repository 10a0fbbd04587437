"""Whether the database holds the schema this code needs (readiness waits for it).

The migration Job and the Deployment apply together with nothing ordering them: a node may
start before its migrations ran. It then stays unready ("schema_behind") and refuses requests
until every migration file it ships is recorded as applied. A newer schema (files this code
does not know) is fine: migrations are backward compatible (expand, then contract).
"""

from __future__ import annotations

import logging

import asyncpg

from affinity_node.store.migrate import required_migrations
from affinity_node.store.queries import QUERIES as Q

log = logging.getLogger(__name__)


class SchemaWatch:
    """Polled until the schema is current; then it stays current (a schema never shrinks)."""

    def __init__(self, db: asyncpg.Pool, timeout_s: float) -> None:
        self._db = db
        self._timeout_s = timeout_s
        self.required = required_migrations()
        self.missing: frozenset[str] = self.required
        self.checked = False

    @property
    def current(self) -> bool:
        return not self.missing

    async def check(self) -> bool:
        """One look at the migrations ledger; a database error leaves the last answer."""
        if self.current:
            return True
        try:
            rows = await self._db.fetch(Q["schema_applied"], timeout=self._timeout_s)
        except asyncpg.UndefinedTableError:
            rows = []  # nothing migrated yet
        applied = {r["name"] for r in rows}
        self.missing = self.required - applied
        if self.missing and not self.checked:
            log.warning(
                "the database lacks %d migration(s) this node needs (%s): not ready until "
                "`affinity-node migrate` has run",
                len(self.missing),
                ", ".join(sorted(self.missing)),
            )
        self.checked = True
        if not self.missing:
            log.info("database schema is current")
        return self.current
