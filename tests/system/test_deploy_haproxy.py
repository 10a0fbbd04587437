"""The compose topology for real, without Docker: HAProxy in front of three node processes.

HAProxy runs deploy/haproxy/haproxy.cfg with only what Docker provides rewritten (the
`server-template` over Docker's DNS becomes one `server` line per loopback node, the binds
move to free loopback ports); the nodes run `affinity-node serve` with deploy/config/node.yaml
(listen port, DSN and backend URLs rewritten); the backends are in-process fake vLLM servers
named as in the compose file. Clients use the official openai SDK through HAProxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import openai
import pytest
import yaml

from affinity_node.sim.fake_backend import FakeBackendConfig, RunningFakeBackend, serve
from affinity_node.sim.support import free_port
from affinity_node.store.keys import create_key
from tests.support.tools import require_tool
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
NODE_YAML = REPO / "deploy" / "config" / "node.yaml"
MODEL = "llama-3.1-8b"
NODES = ("node-1", "node-2", "node-3")
KEYS = ("tenant-a", "tenant-b", "tenant-c")
CONCURRENCY = 4
"""Requests in flight at once during the kill: at most this many may fail."""
MAX_REQUESTS = 600
"""Bound on the kill phase, whatever the timing."""


def haproxy_binary() -> str:
    return require_tool("haproxy", "apt-get install haproxy")


def derive_haproxy_cfg(text: str, front: int, stats: int, nodes: dict[str, tuple[int, int]]) -> str:
    """deploy/haproxy/haproxy.cfg on loopback; `nodes`: name -> (API port, ops port).
    Everything else (checks, balance, timeouts, retries) stays as deployed; a config this
    cannot map fails loudly."""
    out: list[str] = []
    section = ""
    done = Counter[str]()
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].strip()
        if stripped and not line[0].isspace():
            section = stripped
        if section.startswith("resolvers "):
            continue  # Docker's DNS (127.0.0.11) does not exist here
        if stripped.startswith("bind "):
            ports = {"frontend openai": front, "frontend stats": stats}
            assert section in ports, f"unexpected bind in {section!r}: {line}"
            line = f"    bind 127.0.0.1:{ports[section]}"
            done.update([section])
        elif stripped.startswith("server-template "):
            words = stripped.split()[4:]
            docker_only = {"resolvers", "docker", "resolve-prefer", "ipv4", "init-addr", "none"}
            options = " ".join(w for w in words if w not in docker_only)
            assert "check" in options.split(), stripped
            # Checks go to each node's ops port (`port 8081` in the file).
            assert re.search(r"\bport \d+\b", options), stripped
            out += [
                f"    server {name} 127.0.0.1:{api} "
                + re.sub(r"\bport \d+", f"port {ops}", options)
                for name, (api, ops) in nodes.items()
            ]
            done.update(["servers"])
            continue
        out.append(line)
    expected = {"frontend openai": 1, "frontend stats": 1, "servers": 1}
    assert done == expected, f"cannot map haproxy.cfg: {done}"
    return "\n".join(out) + "\n"


def derive_node_config(
    dsn: str, port: int, ops_port: int, backends: dict[str, str]
) -> dict[str, Any]:
    """deploy/config/node.yaml with the addresses Docker would provide replaced by loopback,
    and health checks every second (the file's 5 s would make the outage phase slow)."""
    data: dict[str, Any] = yaml.safe_load(NODE_YAML.read_text(encoding="utf-8"))
    assert data["listen"]["ops_port"], "the compose nodes serve probes on an ops port"
    data["listen"] = {**data["listen"], "host": "127.0.0.1", "port": port, "ops_port": ops_port}
    data["health"] = {**data["health"], "interval_seconds": 1}
    data["database"] = {**data.get("database", {}), "dsn": dsn}
    for backend in data["backends"]:
        backend["url"] = backends[urlsplit(backend["url"]).hostname or ""]
    return data


@dataclass
class Proc:
    name: str
    port: int
    process: asyncio.subprocess.Process
    log: Path
    log_file: IO[bytes]
    ops_port: int = 0


@dataclass
class Outcome:
    key: str
    started: float
    ended: float
    node: str | None = None
    backend: str | None = None
    affinity: str | None = None
    error: str | None = None


async def spawn(
    name: str,
    port: int,
    argv: list[str],
    log: Path,
    stack: AsyncExitStack,
    env: dict[str, str] | None = None,
) -> Proc:
    log_file = log.open("wb")
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=log_file,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
    )
    proc = Proc(name, port, process, log, log_file)
    stack.push_async_callback(stop, proc)
    return proc


async def stop(proc: Proc) -> None:
    """SIGTERM, then SIGKILL if it lingers; always reaps and closes the log."""
    try:
        if proc.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.process.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.process.kill()
                await proc.process.wait()
    finally:
        proc.log_file.close()
        tail = proc.log.read_text(errors="replace").splitlines()[-25:]
        print(f"--- {proc.name} (exit {proc.process.returncode}) ---", *tail, sep="\n")


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def server_states(http: aiohttp.ClientSession, stats_port: int) -> dict[str, str]:
    """HAProxy's view of the `nodes` backend: server name -> status (UP, DOWN, ...)."""
    try:
        async with http.get(
            f"http://127.0.0.1:{stats_port}/stats;csv", timeout=aiohttp.ClientTimeout(total=2)
        ) as r:
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return {}
    rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
    return {
        row["svname"]: row["status"]
        for row in rows
        if row["pxname"] == "nodes" and row["svname"] not in ("FRONTEND", "BACKEND")
    }


async def chat(client: openai.AsyncOpenAI, key: str, i: int, stream: bool) -> Outcome:
    """One request; any exception is a failed request (recorded, not raised)."""
    outcome = Outcome(key, time.monotonic(), 0.0)
    messages = [
        {"role": "system", "content": f"You assist {key}. " * 20},
        {"role": "user", "content": f"question {i}"},
    ]
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, stream=stream
        )  # type: ignore[arg-type]
        if stream:
            finish = None
            async for chunk in raw.parse():  # type: ignore[union-attr]
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            assert finish == "stop", f"stream ended without finish_reason ({finish})"
        else:
            assert raw.parse().choices[0].message.content  # type: ignore[union-attr]
        outcome.node = raw.headers["x-affinity-node"]
        outcome.backend = raw.headers["x-backend-id"]
        outcome.affinity = raw.headers["x-affinity"]
    except Exception as exc:  # the count of failures is what this test measures
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.ended = time.monotonic()
    return outcome


@contextlib.asynccontextmanager
async def topology(dsn: str, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    haproxy = haproxy_binary()
    async with AsyncExitStack() as stack:
        # Backends named as the compose services: backend1..backend4.
        wanted = [
            urlsplit(b["url"]).hostname for b in yaml.safe_load(NODE_YAML.read_text())["backends"]
        ]
        fakes: dict[str, RunningFakeBackend] = {}
        for name in wanted:
            assert name is not None
            # ~80 ms per answer, so requests are in flight when a node dies.
            fakes[name] = await serve(
                FakeBackendConfig(
                    backend_id=name, models=[MODEL], tokens_per_s=200.0, output_tokens=16
                )
            )
            stack.push_async_callback(fakes[name].close)

        env = {k: v for k, v in os.environ.items() if not k.startswith("AFFINITY_")}
        nodes: dict[str, Proc] = {}
        for name in NODES:
            port, ops_port = free_port(), free_port()
            cfg = derive_node_config(dsn, port, ops_port, {n: f.url for n, f in fakes.items()})
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
            nodes[name] = await spawn(
                name,
                port,
                [sys.executable, "-m", "affinity_node", "serve", "--config", str(path)],
                tmp_path / f"{name}.log",
                stack,
                env={**env, "AFFINITY_NODE_ID": name},
            )
            nodes[name].ops_port = ops_port

        front, stats = free_port(), free_port()
        cfg_path = tmp_path / "haproxy.cfg"
        cfg_path.write_text(
            derive_haproxy_cfg(
                HAPROXY_CFG.read_text(),
                front,
                stats,
                {n: (p.port, p.ops_port) for n, p in nodes.items()},
            )
        )
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def all_ready() -> bool:
            codes = await asyncio.gather(
                *(status_of(http, f"http://127.0.0.1:{p.ops_port}/readyz") for p in nodes.values())
            )
            assert all(p.process.returncode is None for p in nodes.values()), "a node exited"
            return all(code == 200 for code in codes)

        await wait_for(all_ready, timeout=60, interval=0.1, what="3 nodes ready")
        check = await asyncio.create_subprocess_exec(
            haproxy,
            "-c",
            "-f",
            str(cfg_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await check.communicate()
        assert check.returncode == 0, out.decode()
        proxy = await spawn(
            "haproxy", front, [haproxy, "-db", "-f", str(cfg_path)], tmp_path / "haproxy.log", stack
        )

        async def all_up() -> bool:
            assert proxy.process.returncode is None, "haproxy exited"
            states = await server_states(http, stats)
            return sorted(states) == sorted(NODES) and set(states.values()) == {"UP"}

        await wait_for(all_up, timeout=30, interval=0.1, what="haproxy sees 3 nodes UP")

        conn = await asyncpg.connect(dsn)
        try:
            secrets = {name: (await create_key(conn, name))[1] for name in KEYS}
        finally:
            await conn.close()
        clients = {}
        for name, secret in secrets.items():
            clients[name] = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{front}/v1", api_key=secret, max_retries=0, timeout=30.0
            )
            stack.push_async_callback(clients[name].close)
        yield {
            "nodes": nodes,
            "clients": clients,
            "http": http,
            "stats": stats,
            "front": front,
            "fakes": fakes,
        }


async def test_haproxy_in_front_of_three_nodes_sticks_and_survives_a_killed_node(
    dsn: str, tmp_path: Path
) -> None:
    async with asyncio.timeout(240), topology(dsn, tmp_path) as t:
        nodes: dict[str, Proc] = t["nodes"]
        clients: dict[str, openai.AsyncOpenAI] = t["clients"]
        http: aiohttp.ClientSession = t["http"]

        # 1. Sequential requests: leastconn rotates them over the nodes; each key keeps one
        #    backend whichever node serves it.
        first: list[Outcome] = []
        for key in KEYS:  # key by key: interleaving 3 keys over 3 nodes would align them
            for i in range(6):
                first.append(await chat(clients[key], key, i, stream=i % 3 == 2))
        assert [o.error for o in first if o.error] == []
        bound = {key: {o.backend for o in first if o.key == key} for key in KEYS}
        assert all(len(b) == 1 for b in bound.values()), bound
        backend_of = {key: next(iter(b)) for key, b in bound.items()}
        for key in KEYS:
            assert len({o.node for o in first if o.key == key}) >= 2, f"{key} saw one node"
        assert {o.node for o in first} == set(NODES)

        # 2. Concurrent load; SIGKILL one node mid-run; go on until HAProxy has marked it
        #    DOWN and the survivors served a good number more.
        victim = nodes["node-2"]
        survivors = set(NODES) - {victim.name}
        outcomes: list[Outcome] = []
        killed_at = 0.0
        down_at = 0.0
        counter = 0

        def after_down() -> int:
            return sum(1 for o in outcomes if down_at and o.started >= down_at)

        async def worker() -> None:
            nonlocal counter
            while counter < MAX_REQUESTS and after_down() < 60:
                i = counter
                counter += 1
                key = KEYS[i % len(KEYS)]
                outcomes.append(await chat(clients[key], key, 100 + i, stream=i % 4 == 0))

        async def killer() -> None:
            nonlocal killed_at, down_at
            await wait_for(lambda: len(outcomes) >= 40, timeout=60, what="40 requests done")
            victim.process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await wait_for(
                lambda: victim.process.returncode is not None, timeout=10, what="the victim died"
            )

            async def victim_down() -> bool:
                states = await server_states(http, t["stats"])
                return states.get(victim.name) == "DOWN"

            await wait_for(victim_down, timeout=30, interval=0.1, what="haproxy marks it DOWN")
            down_at = time.monotonic()

        async with asyncio.TaskGroup() as tasks:  # a failure cancels the rest
            tasks.create_task(killer())
            for _ in range(CONCURRENCY):
                tasks.create_task(worker())

        failed = [o for o in outcomes if o.error]
        print(
            f"kill phase: {len(outcomes)} requests, {len(failed)} failed, "
            f"{sum(1 for o in outcomes if o.started >= killed_at)} started after the kill",
            *(o.error for o in failed),
            sep="\n",
        )
        # Only requests in flight on the killed node may fail: started before the kill,
        # unfinished at it, and no more than could be in flight at once.
        assert len(failed) <= CONCURRENCY, [o.error for o in failed]
        for o in failed:
            assert o.started <= killed_at <= o.ended, f"failed outside the kill: {o.error}"
        assert after_down() >= 60, "the run stopped before the survivors took over"

        ok = [o for o in outcomes if not o.error]
        for key in KEYS:
            # Same backend for the whole run, before and after the kill, on every node.
            assert {o.backend for o in ok if o.key == key} == {backend_of[key]}, key
        later = [o for o in ok if o.started > killed_at]
        assert {o.node for o in later} == survivors, Counter(o.node for o in later)
        assert {o.affinity for o in later} <= {"hit", "miss"}, Counter(o.affinity for o in later)
        per_node: dict[str, int] = defaultdict(int)
        for o in ok:
            per_node[o.node or "?"] += 1
        assert per_node[victim.name] > 0, "the victim served nothing before the kill"
        states = await server_states(http, t["stats"])
        assert {n: states[n] for n in survivors} == dict.fromkeys(survivors, "UP")
        assert all(nodes[n].process.returncode is None for n in survivors)

        # 3. What clients see through HAProxy: never the nodes' probes or metrics...
        front = t["front"]
        for path in ("/metrics", "/readyz", "/healthz"):
            async with http.get(f"http://127.0.0.1:{front}{path}") as r:
                assert r.status == 404, path
                assert (await r.json())["error"]["code"] == "unknown_url"
        async with http.get(f"http://127.0.0.1:{t['stats']}/ready") as r:
            assert r.status == 200  # HAProxy's own readiness: some node is in rotation

        # ...and, with every backend down, the node's own OpenAI 503, not HAProxy's bare one:
        # readiness does not follow the backends, so the nodes stay in rotation.
        fakes: dict[str, RunningFakeBackend] = t["fakes"]
        for fake in fakes.values():
            async with http.post(f"{fake.url}/admin/fail", json={"status": 503}) as r:
                assert r.status == 200

        async def no_backend_anywhere() -> bool:
            for name in survivors:
                async with http.get(f"http://127.0.0.1:{nodes[name].ops_port}/readyz") as r:
                    state = await r.json()
                    assert r.status == 200, state
                    if state["healthy_backends"]:
                        return False
            return True

        await wait_for(no_backend_anywhere, timeout=20, interval=0.2, what="backends ejected")
        client = clients[KEYS[0]]
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "anyone?"}]
            )
        assert err.value.status_code == 503
        assert err.value.body["code"] == "no_healthy_backend"
        assert err.value.response.headers["retry-after"] == "1"
        assert err.value.response.headers["x-affinity-node"] in survivors
        states = await server_states(http, t["stats"])
        assert {n: states[n] for n in survivors} == dict.fromkeys(survivors, "UP")
