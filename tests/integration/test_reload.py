"""SIGHUP on a real `affinity-node serve` process: the safe subset of a changed config file is
applied without a restart (log level, access log, the static backend list), the config hash
metric follows it, and a file that is invalid or needs a rollout is refused while the node
goes on serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import yaml

from affinity_node.app import run_node
from affinity_node.app.reload import reload_config
from affinity_node.config import config_hash, load_config
from affinity_node.sim.fake_backend import FakeBackendConfig, serve
from affinity_node.sim.support import free_port
from affinity_node.store.keys import create_key
from tests.support.cluster import MODEL
from tests.support.waiting import wait_for

MESSAGES = [{"role": "user", "content": "hello"}]
CONFIG_INFO = re.compile(r'^affinity_config_info\{hash="([0-9a-f]+)"\} 1\.0$', re.M)


def _lines(log: Path) -> list[dict[str, Any]]:
    text = log.read_text(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_sighup_applies_the_safe_subset_and_refuses_the_rest(dsn, tmp_path):
    b1 = await serve(FakeBackendConfig(backend_id="b1", models=[MODEL]))
    b2 = await serve(FakeBackendConfig(backend_id="b2", models=[MODEL]))
    port = free_port()
    path = tmp_path / "node.yaml"
    cfg: dict[str, Any] = {
        "node_id": "reload-a",
        "listen": {"host": "127.0.0.1", "port": port},
        "database": {"dsn": dsn},
        "backends": [{"url": b1.url, "models": [MODEL]}],
        "models": [{"name": MODEL}],
        "logging": {"level": "INFO", "json": True, "access": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    conn = await asyncpg.connect(dsn)
    try:
        _, secret = await create_key(conn, "alice")
    finally:
        await conn.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFFINITY_")}
    log = tmp_path / "node.log"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "affinity_node", "serve", "--config", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0)
    try:
        async with aiohttp.ClientSession() as http:

            async def hashes() -> list[str]:
                try:
                    async with http.get(base + "/metrics") as r:
                        return CONFIG_INFO.findall(await r.text())
                except aiohttp.ClientConnectionError:
                    return []

            async def served_by() -> str | None:
                answer = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
                return answer.system_fingerprint

            async def reload_to(new_cfg: dict[str, Any] | str) -> None:
                text = new_cfg if isinstance(new_cfg, str) else yaml.safe_dump(new_cfg)
                path.write_text(text)
                proc.send_signal(signal.SIGHUP)

            first = config_hash(load_config(path, env={}))
            await wait_for(lambda: _eq(hashes(), [first]), timeout=20, what="node up, hash")
            assert await served_by() == "b1"
            assert not any(line.get("level") == "debug" for line in _lines(log))
            assert not any("route" in line for line in _lines(log))  # no access lines yet

            # The safe subset: debug logging, the access log on, b1 replaced by b2.
            changed = {
                **cfg,
                "backends": [{"url": b2.url, "models": [MODEL]}],
                "logging": {"level": "DEBUG", "json": True, "access": True},
                "limits": {"generation_timeout_seconds": 120},
            }
            await reload_to(changed)
            second = config_hash(load_config(path, env={}))
            assert second != first
            await wait_for(lambda: _eq(hashes(), [second]), timeout=10, what="new hash")
            assert [await served_by() for _ in range(3)] == ["b2"] * 3
            lines = _lines(log)
            assert any(
                line.get("level") == "debug" and line["msg"].startswith("config in effect")
                for line in lines
            ), lines[-5:]

            def access() -> list[dict[str, Any]]:
                return [x for x in _lines(log) if x.get("route") == "/v1/chat/completions"]

            async def three_access_lines() -> bool:  # written once each answer has gone
                return len(access()) == 3

            await wait_for(three_access_lines, timeout=5, what="access lines")
            # Switched on by the reload, the log gets every field: the node reads the
            # answers' usage for it, as for a log on from the start.
            for line in access():
                assert line["status"] == 200 and line["backend"] and line["model"] == MODEL
                assert line["stream"] is False and line["ttft_ms"] is not None
                assert line["prompt_tokens"] and line["completion_tokens"], line
            assert dsn not in log.read_text()

            # Refused: a file that does not parse, then a change that needs a rollout.
            for bad, why in (
                ("backends: [unclosed\n", "not valid YAML"),
                ({**changed, "database": {"dsn": dsn, "pool_max": 3}}, "database.pool_max"),
            ):
                before = len(_lines(log))
                await reload_to(bad)

                async def refused(why: str = why, before: int = before) -> bool:
                    return any(
                        "config reload refused" in line["msg"] and why in line["msg"]
                        for line in _lines(log)[before:]
                    )

                await wait_for(refused, timeout=10, what=f"refusal: {why}")
                assert await hashes() == [second]
                assert await served_by() == "b2"
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert not any(line.get("level") == "error" and "refused" not in line["msg"]
                       for line in _lines(log))  # fmt: skip
        assert secret not in log.read_text()
    finally:
        await client.close()
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait()
        await b1.close()
        await b2.close()


async def _eq(value: Any, expected: Any) -> bool:
    return (await value) == expected


async def test_a_reloaded_generation_timeout_applies_to_the_next_request(dsn, tmp_path):
    slow = await serve(
        FakeBackendConfig(backend_id="slow", models=[MODEL], tokens_per_s=25.0, output_tokens=25)
    )
    path = tmp_path / "node.yaml"
    cfg: dict[str, Any] = {
        "node_id": "reload-b",
        "listen": {"host": "127.0.0.1", "port": 0},
        "database": {"dsn": dsn},
        "backends": [{"url": slow.url, "models": [MODEL]}],
        "models": [{"name": MODEL}],
        "limits": {"upstream_read_timeout_seconds": 0.5},
    }
    path.write_text(yaml.safe_dump(cfg))
    conn = await asyncpg.connect(dsn)
    try:
        _, secret = await create_key(conn, "bob")
    finally:
        await conn.close()
    try:
        async with run_node(load_config(path, env={})) as node:
            client = openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=secret, max_retries=0)
            answer = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            assert answer.system_fingerprint == "slow"  # about 1 s of generation: allowed
            cfg["limits"]["generation_timeout_seconds"] = 0.5
            path.write_text(yaml.safe_dump(cfg))
            assert reload_config(node.app, path)
            try:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
                raise AssertionError("a generation outlived the reloaded timeout")
            except openai.APIStatusError as exc:
                assert exc.status_code == 504
                assert exc.body["code"] == "upstream_timeout"
            await client.close()
    finally:
        await slow.close()
