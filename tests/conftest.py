from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from affinity_node.store.migrate import migrate
from tests.support.postgres import postgres_server, unique_name, with_database


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
        conn = await asyncpg.connect(pg_admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        await migrate(with_database(pg_admin_dsn, name))

    asyncio.run(setup())
    yield name

    async def teardown() -> None:
        conn = await asyncpg.connect(pg_admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(teardown())


@pytest.fixture
async def dsn(pg_admin_dsn: str, pg_template: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test."""
    name = unique_name("affinity_test")
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    finally:
        await conn.close()
    yield with_database(pg_admin_dsn, name)
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def empty_dsn(pg_admin_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no schema (for migration tests)."""
    name = unique_name("affinity_empty")
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield with_database(pg_admin_dsn, name)
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()
