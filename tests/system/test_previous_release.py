"""Expand/contract: the previous release's node serves on the schema the new code migrated.

During a rolling update old pods keep serving after the migration Job ran, so every migration
must be backward compatible. The previous release (AFFINITY_PREVIOUS_RELEASE, a git revision)
is exported from this repository and run from its source with this venv's packages.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import aiohttp
import asyncpg
import openai
import pytest
import yaml

from affinity_node.sim.fake_backend import FakeBackendConfig, serve
from affinity_node.sim.support import free_port
from affinity_node.store.keys import create_key
from tests.support.cluster import MODEL
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
PREVIOUS = os.environ.get("AFFINITY_PREVIOUS_RELEASE", "4714a6e")


def _export(revision: str, into: Path) -> Path:
    """The release's package and migrations, as `git archive` gives them (no worktree)."""
    try:
        data = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "affinity_node", "db"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"cannot export {revision}: {exc}")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


async def test_the_previous_release_serves_on_the_new_schema(dsn: str, tmp_path: Path) -> None:
    old = _export(PREVIOUS, tmp_path / "previous")
    backend = await serve(FakeBackendConfig(backend_id="b0", models=[MODEL]))
    port = free_port()
    cfg = {
        "node_id": "previous-release",
        "listen": {"host": "127.0.0.1", "port": port},
        "database": {"dsn": dsn},  # migrated by this code (the fixture's template)
        "backends": [{"url": backend.url, "models": [MODEL]}],
        "models": [{"name": MODEL}],
    }
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(cfg))
    conn = await asyncpg.connect(dsn)
    try:
        _, secret = await create_key(conn, "rolling")
    finally:
        await conn.close()
    env = {**os.environ, "PYTHONPATH": str(old)}
    check = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import affinity_node; print(affinity_node.__file__)",
        env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    where = (await asyncio.wait_for(check.communicate(), 30))[0].decode()
    assert where.startswith(str(old)), where  # the old code runs, not this checkout
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "affinity_node", "serve", "--config", str(tmp_path / "node.yaml"),
        env=env, cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0)
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                try:
                    async with http.get(base + "/readyz") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_for(ready, timeout=30, what="the previous release's node ready")
            for _ in range(3):
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": "hello"}]
                )
                assert raw.parse().choices
            assert raw.headers["x-affinity"] == "hit"  # its bindings work on the new schema
    finally:
        await client.close()
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        await backend.close()
    assert b"Traceback" not in err, err.decode()[-3000:]
