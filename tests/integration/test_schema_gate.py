"""Readiness waits for the schema the code needs: the Deployment and the migration Job apply
together with nothing ordering them, so a node may start on an older schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest

from affinity_node.store.migrate import load_migrations, migrate, migrations_dir
from tests.integration.test_ops import MESSAGES, one_node
from tests.support.cluster import MODEL
from tests.support.waiting import wait_for


async def test_a_node_on_an_older_schema_is_not_ready_and_serves_nothing_until_migrated(
    empty_dsn: str, tmp_path: Path
) -> None:
    older = tmp_path / "older"
    older.mkdir()
    files = sorted(migrations_dir().glob("*.sql"))
    for f in files[:-1]:  # the previous release's schema: all but the newest file
        shutil.copy(f, older / f.name)
    await migrate(empty_dsn, older)
    async with one_node(empty_dsn) as n:
        status, body, _ = await n.get(f"{n.node.url}/readyz")
        assert (status, json.loads(body)["status"]) == (503, "schema_behind")
        with pytest.raises(openai.APIStatusError) as err:
            await n.client().chat.completions.create(model=MODEL, messages=MESSAGES)
        assert err.value.status_code == 503
        assert err.value.body["code"] == "schema_behind"
        assert (await n.get(f"{n.node.url}/healthz"))[0] == 200  # liveness stays up

        assert await migrate(empty_dsn) == [load_migrations()[-1].name]

        async def ready() -> bool:
            return (await n.get(f"{n.node.url}/readyz"))[0] == 200

        await wait_for(ready, timeout=10, what="readiness once the schema is current")
        answer = await n.client().chat.completions.create(model=MODEL, messages=MESSAGES)
        assert answer.choices


async def test_a_node_on_a_newer_schema_is_ready(dsn: str, db) -> None:  # type: ignore[no-untyped-def]
    """Expand/contract: a file this code does not know (the next release's) keeps it ready."""
    await db.execute(
        "INSERT INTO affinity_schema_migrations (name, checksum) VALUES ('9999_next.sql', 'x')"
    )
    async with one_node(dsn) as n:
        status, body, _ = await n.get(f"{n.node.url}/readyz")
        assert (status, json.loads(body)["status"]) == (200, "ready")
