"""The official `openai` npm package, from a Node script, through 3 nodes: chat (plain and
streamed), a Responses chain whose turns each go through another node, retrieve, embeddings.
Node and the package are real; so are the nodes, the fake vLLM backends and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import MODEL, cluster

SDK_DIR = Path(__file__).resolve().parents[1] / "support" / "node_sdk"
SOURCES = ("package.json", "package-lock.json", "script.mjs")
INSTALL_TIMEOUT = 90.0
SCRIPT_TIMEOUT = 45.0

pytestmark = pytest.mark.timeout(150)


def require_binary(name: str) -> str:
    """The binary's path; skips when absent, except under CI=true where that is a failure."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is not installed (CI installs it: see .ci/run)")
        pytest.skip(
            f"{name} is not installed: apt-get install nodejs npm to run the openai npm SDK"
        )
    return path


def cache_root(config: pytest.Config) -> Path:
    cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
    return cache.mkdir("node_sdk") if cache is not None else Path(tempfile.gettempdir())


def installed_sdk(root: Path) -> Path:
    """A directory holding the script and `npm ci`'s node_modules, keyed by the sources' hash,
    so only a changed lock or script installs again. Built aside, then renamed into place:
    a half-done install is never used, and parallel runs never share one."""
    digest = hashlib.sha256(b"".join((SDK_DIR / n).read_bytes() for n in SOURCES)).hexdigest()
    target = root / f"openai-sdk-{digest[:16]}"
    if (target / "node_modules" / "openai" / "package.json").is_file():
        return target
    work = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=root))
    try:
        for name in SOURCES:
            shutil.copy(SDK_DIR / name, work / name)
        done = subprocess.run(
            [require_binary("npm"), "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
        with contextlib.suppress(OSError):  # another run got there first: use its install
            work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in root.glob("openai-sdk-*"):  # installs of earlier sources (not one under way)
        if old != target and "." not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return target


@pytest.fixture(scope="module")
def sdk_dir(request: pytest.FixtureRequest) -> Path:
    require_binary("node")
    return installed_sdk(cache_root(request.config))


async def run_script(sdk: Path, base_urls: list[str], api_key: str) -> dict[str, Any]:
    """Runs the script without blocking the loop (the nodes serve from this very loop)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "BASE_URLS": ",".join(base_urls),
        "API_KEY": api_key,
        "MODEL": MODEL,
    }
    proc = await asyncio.create_subprocess_exec(
        require_binary("node"),
        "script.mjs",
        cwd=sdk,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SCRIPT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"node script.mjs ran past {SCRIPT_TIMEOUT}s") from None
    assert proc.returncode == 0, f"node script.mjs exited {proc.returncode}:\n{err.decode()}"
    lines = out.decode().strip().splitlines()
    assert len(lines) == 1, out.decode()
    result: dict[str, Any] = json.loads(lines[0])
    return result


async def test_the_openai_npm_sdk_through_three_nodes(sdk_dir: Path, dsn: str) -> None:
    async with cluster(dsn, nodes=3, backends=3) as c:
        secret = await c.new_key("node-sdk")
        seen = await run_script(sdk_dir, [f"{n.url}/v1" for n in c.nodes], secret)
    print(json.dumps(seen, indent=1))  # shown when an assertion below fails

    backend_ids = {b.backend.cfg.backend_id for b in c.backends}
    node_ids = [f"node-{i}" for i in range(3)]  # as cluster() names them
    assert seen["node_version"].startswith("v") and seen["sdk_version"]

    chat, stream = seen["chat"], seen["chat_stream"]
    assert chat["text"] and stream["text"] and stream["chunks"] > 1
    assert stream["completion_tokens"] and stream["completion_tokens"] > 0
    assert (chat["node"], stream["node"]) == (node_ids[0], node_ids[1])
    # One key, one model: the second node sends the pair where the first bound it.
    assert chat["backend"] in backend_ids and stream["backend"] == chat["backend"]
    # A new key's first request binds; node-1 has it from its cache or, when the
    # notification is still on its way, from the table: either way affinity applied.
    assert chat["affinity"] == "miss" and stream["affinity"] in ("hit", "miss")

    chain = seen["chain"]
    assert [t["node"] for t in chain] == node_ids  # each turn through another node
    assert [t["stream"] for t in chain] == [False, True, False]
    assert len({t["backend"] for t in chain}) == 1, chain  # every turn where the chain is stored
    assert chain[0]["backend"] in backend_ids
    for t in chain:
        assert t["text"] and t["status"] in ("completed", "incomplete"), t
        assert t["id"].startswith("resp_") and "." in t["id"], t  # tagged with its owner
    assert [t["affinity"] for t in chain[1:]] == ["hit", "hit"]
    assert len({t["id"] for t in chain}) == 3

    retrieved = seen["retrieved"]
    assert retrieved["id"] == chain[-1]["id"] and retrieved["status"] == chain[-1]["status"]
    assert retrieved["backend"] == chain[0]["backend"] and retrieved["node"] == node_ids[0]

    emb = seen["embeddings"]
    assert emb["node"] == node_ids[2] and emb["backend"] in backend_ids
    assert emb["count"] == 2 and all(d > 8 for d in emb["dims"])
