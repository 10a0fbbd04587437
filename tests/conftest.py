from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from affinity_node.devtools.support import with_database
from affinity_node.store.migrate import migrate
from tests.support.postgres import postgres_server, unique_name


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    with postgres_server() as (dsn, source):
        print(f"\nPostgres for tests: {source}")
        yield dsn


@pytest.fixture(scope="session")
def pg_template(pg_admin_dsn: str) -> Iterator[str]:
    """A database migrated once; every test clones it."""
    name = unique_name("affinity_tpl")

    async def setup() -> None:
        await _admin(pg_admin_dsn, f'CREATE DATABASE "{name}"')
        await migrate(with_database(pg_admin_dsn, name))

    asyncio.run(setup())
    yield name
    asyncio.run(_admin(pg_admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _scratch_database(admin_dsn: str, template: str | None) -> AsyncIterator[str]:
    name = unique_name("affinity_test")
    clause = f' TEMPLATE "{template}"' if template else ""
    await _admin(admin_dsn, f'CREATE DATABASE "{name}"{clause}')
    yield with_database(admin_dsn, name)
    await _admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def dsn(pg_admin_dsn: str, pg_template: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test."""
    async for d in _scratch_database(pg_admin_dsn, pg_template):
        yield d


@pytest.fixture
async def empty_dsn(pg_admin_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no schema (for migration tests)."""
    async for d in _scratch_database(pg_admin_dsn, None):
        yield d


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()


LAYERS = ("unit", "integration", "system")
DATABASE_FIXTURES = frozenset({"pg_admin_dsn", "pg_template", "dsn", "empty_dsn", "db"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test is marked by its folder; a unit test that asks for Postgres is an error."""
    for item in items:
        layer = item.path.parent.name
        if layer not in LAYERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/{{{','.join(LAYERS)}}}")
        item.add_marker(getattr(pytest.mark, layer))
        if layer == "unit":
            wanted = DATABASE_FIXTURES & set(getattr(item, "fixturenames", ()))
            if wanted:
                raise pytest.UsageError(
                    f"{item.nodeid}: unit tests run without Postgres "
                    f"(asks for {', '.join(sorted(wanted))})"
                )
