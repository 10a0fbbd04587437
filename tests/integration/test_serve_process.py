"""`affinity-node serve` as users run it: a real process, a config file, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys

import aiohttp
import asyncpg
import openai
import yaml

from affinity_node.sim.fake_backend import FakeBackendConfig, serve
from affinity_node.sim.support import free_port
from affinity_node.store.keys import create_key
from tests.support.cluster import MODEL
from tests.support.waiting import wait_for


async def test_sigterm_drains_an_open_stream(dsn, tmp_path):
    backend = await serve(
        FakeBackendConfig(backend_id="slow", models=[MODEL], tokens_per_s=25.0, output_tokens=50)
    )
    port = free_port()
    cfg = {
        "node_id": "proc-a",
        "listen": {"host": "127.0.0.1", "port": port},
        "database": {"dsn": dsn},
        "backends": [{"url": backend.url, "models": [MODEL]}],
        "models": [{"name": MODEL}],
        "limits": {"drain_timeout_seconds": 20},
        "logging": {"level": "INFO", "json": True},
    }
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(cfg))
    conn = await asyncpg.connect(dsn)
    try:
        _, secret = await create_key(conn, "alice")
    finally:
        await conn.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "affinity_node",
        "serve",
        "--config",
        str(tmp_path / "node.yaml"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0)
    try:
        async with aiohttp.ClientSession() as http:

            async def status(path: str) -> int:
                try:
                    async with http.get(base + path) as r:
                        return r.status
                except aiohttp.ClientConnectionError:
                    return 0

            await wait_for(lambda: _eq(status("/readyz"), 200), timeout=20, what="node ready")
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "a long answer"}], stream=True
            )
            chunks = []
            async for chunk in stream:
                chunks.append(chunk)
                break
            proc.send_signal(signal.SIGTERM)
            await wait_for(lambda: _eq(status("/readyz"), 503), timeout=5, what="draining")
            try:
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "new"}]
                )
                raise AssertionError("a new request was accepted while draining")
            except openai.InternalServerError as exc:
                assert exc.status_code == 503
                assert exc.body["code"] == "draining"
            async for chunk in stream:  # the open stream runs to its end
                chunks.append(chunk)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert len(text.split()) >= 40
            assert chunks[-1].choices[0].finish_reason == "stop"
        code = await asyncio.wait_for(proc.wait(), 20)
        assert code == 0
        _out, err = await proc.communicate()
        lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
        messages = [line["msg"] for line in lines]
        assert any("draining" in m for m in messages)
        assert messages[-1] == "stopped"
        assert not any(line["level"] == "error" for line in lines), lines
        assert secret not in err.decode()
    finally:
        await client.close()
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait()
        await backend.close()


async def _eq(value, expected) -> bool:
    return (await value) == expected
