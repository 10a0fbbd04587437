"""Operations surface of a node: readiness semantics, the operations port, the access log.

Real nodes on loopback, fake vLLM backends, real Postgres, the openai SDK as the client.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import openai
import pytest

from affinity_node.app import RunningNode, run_node
from affinity_node.config import NodeConfig
from affinity_node.http.state import ACCESS_LOG
from affinity_node.observability.logs import ACCESS_FIELDS, ACCESS_LOGGER, configure_logging
from affinity_node.sim.fake_backend import FakeBackendConfig, RunningFakeBackend, serve
from affinity_node.store.keys import create_key
from tests.support.cluster import ALIAS, MODEL, cluster, knows, node_config
from tests.support.nodes import bulk_bindings
from tests.support.waiting import wait_for

MESSAGES = [{"role": "user", "content": "hello"}]
KEY_REF_SECRET = "log-secret"


def key_ref(key_id: str) -> str:
    """What the access log should name a key by: the HMAC an operator can recompute."""
    mac = hmac.new(KEY_REF_SECRET.encode(), uuid.UUID(key_id).bytes, hashlib.sha256)
    return mac.hexdigest()[:24]


RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@dataclass
class Node:
    node: RunningNode
    backends: list[RunningFakeBackend]
    secret: str
    key_id: str
    http: aiohttp.ClientSession
    stack: AsyncExitStack

    def client(self, secret: str | None = None) -> openai.AsyncOpenAI:
        c = openai.AsyncOpenAI(
            base_url=f"{self.node.url}/v1", api_key=secret or self.secret, max_retries=0
        )
        self.stack.push_async_callback(c.close)
        return c

    async def get(self, url: str) -> tuple[int, str, dict[str, str]]:
        async with self.http.get(url) as r:
            return r.status, await r.text(), dict(r.headers)

    async def fail_backends(self, failing: bool) -> None:
        for b in self.backends:
            body = {"status": 503} if failing else {}
            async with self.http.post(f"{b.url}/admin/fail", json=body) as r:
                assert r.status == 200


@asynccontextmanager
async def one_node(dsn: str, **changes: object) -> AsyncIterator[Node]:
    async with AsyncExitStack() as stack:
        fakes = []
        for i in range(2):
            fake = await serve(FakeBackendConfig(backend_id=f"b{i}", models=[MODEL]))
            stack.push_async_callback(fake.close)
            fakes.append(fake)
        cfg: NodeConfig = node_config(dsn, fakes, "ops-node")
        cfg.listen.ops_port = changes.get("ops_port")  # type: ignore[assignment]
        cfg.logging.access = bool(changes.get("access", False))
        cfg.logging.key_ref_secret = KEY_REF_SECRET
        cfg.listen.trusted_proxies = list(changes.get("trusted_proxies", []))  # type: ignore[call-overload]
        node = await stack.enter_async_context(run_node(cfg))
        conn = await asyncpg.connect(dsn)
        try:
            key, secret = await create_key(conn, "ops")
        finally:
            await conn.close()
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield Node(node, fakes, secret, str(key.id), http, stack)


async def test_no_healthy_backend_keeps_the_node_ready_and_answers_openai_503(dsn):
    async with one_node(dsn) as n:
        ready = f"{n.node.url}/readyz"
        status, body, _ = await n.get(ready)
        assert status == 200 and json.loads(body)["models_without_healthy_backend"] == []

        await n.fail_backends(True)  # /health fails too: both get ejected

        async def none_healthy() -> bool:
            status, body, _ = await n.get(ready)
            state = json.loads(body)
            assert status == 200, state  # readiness never follows the backends
            return state["healthy_backends"] == 0

        await wait_for(none_healthy, timeout=10, what="every backend ejected")
        status, body, _ = await n.get(ready)
        state = json.loads(body)
        assert (state["status"], state["models_without_healthy_backend"]) == ("ready", [MODEL])
        with pytest.raises(openai.APIStatusError) as err:
            await n.client().chat.completions.create(model=MODEL, messages=MESSAGES)
        assert err.value.status_code == 503
        assert err.value.body["code"] == "no_healthy_backend"  # the node's own OpenAI body
        assert err.value.response.headers["Retry-After"] == "1"
        status, text, _ = await n.get(f"{n.node.url}/metrics")
        assert f'affinity_model_healthy_backends{{model="{MODEL}"}} 0.0' in text
        assert (await n.get(f"{n.node.url}/healthz"))[0] == 200  # liveness: never backends

        await n.fail_backends(False)

        async def healthy_again() -> bool:
            return json.loads((await n.get(ready))[1])["healthy_backends"] == 2

        await wait_for(healthy_again, timeout=10, what="backends re-admitted")
        await n.client().chat.completions.create(model=MODEL, messages=MESSAGES)

        # Draining is what takes a node out; liveness stays up while it drains.
        assert await n.node.drain(0.1)
        status, body, _ = await n.get(ready)
        assert (status, json.loads(body)["status"]) == (503, "draining")
        assert (await n.get(f"{n.node.url}/healthz"))[0] == 200


async def test_readiness_does_not_wait_for_the_bindings_snapshot_and_shows_how_far_it_is(dsn, db):
    """The node's role cannot read the binding table yet: keys load, pages keep failing (and
    are retried); the node is ready all along, and done once the grant lets the pages in."""
    await bulk_bindings(db, keys=40)
    role = f"snap_{uuid.uuid4().hex[:10]}"
    await db.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'snap'")
    try:
        await db.execute(f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}")
        await db.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}")
        await db.execute(f"REVOKE SELECT ON api_key_model_affinity FROM {role}")
        parts = urlsplit(dsn)
        role_dsn = urlunsplit(
            parts._replace(netloc=f"{role}:snap@{parts.netloc.rpartition('@')[2]}")
        )
        async with one_node(role_dsn) as n:
            status, body, _ = await n.get(n.node.url + "/readyz")
            snapshot = json.loads(body)["snapshot"]
            assert status == 200 and json.loads(body)["status"] == "ready"
            assert (snapshot["state"], snapshot["mode"], snapshot["loaded"]) == (
                "loading",
                "full",
                0,
            )
            await db.execute(f"GRANT SELECT ON api_key_model_affinity TO {role}")

            async def loaded() -> bool:
                body = json.loads((await n.get(n.node.url + "/readyz"))[1])
                return body["snapshot"]["state"] == "done"

            await wait_for(loaded, timeout=15, what="the snapshot to load after the grant")
            snapshot = json.loads((await n.get(n.node.url + "/readyz"))[1])["snapshot"]
            assert (snapshot["mode"], snapshot["loaded"], snapshot["rows_read"]) == ("full", 40, 40)
            assert snapshot["seconds"] > 0
    finally:
        await db.execute(f"DROP OWNED BY {role}")
        await db.execute(f"DROP ROLE {role}")


async def test_the_operations_port_serves_probes_and_metrics_and_the_api_port_does_not(dsn):
    async with one_node(dsn, ops_port=0) as n:
        assert n.node.ops_port not in (None, n.node.port)
        for path in ("/metrics", "/healthz", "/readyz"):
            status, body, headers = await n.get(n.node.url + path)
            assert status == 404, path
            assert json.loads(body)["error"]["code"] == "unknown_url"
            assert "x-request-id" in {h.lower() for h in headers}
        status, body, _ = await n.get(n.node.ops_url + "/readyz")
        assert status == 200 and json.loads(body)["status"] == "ready"
        assert (await n.get(n.node.ops_url + "/healthz"))[:2] == (200, "ok\n")
        await n.client().chat.completions.create(model=MODEL, messages=MESSAGES)
        status, text, _ = await n.get(n.node.ops_url + "/metrics")
        assert status == 200
        # The API request shows on the operations port's registry: one node, one registry.
        assert 'affinity_http_requests_total{code="200",route="/v1/chat/completions"} 1.0' in text
        assert 'affinity_http_requests_total{code="200",route="/readyz"} 1.0' in text
        # The operations port serves nothing else.
        assert (await n.get(n.node.ops_url + "/v1/models"))[0] == 404
        assert await n.node.drain(0.1)
        assert (await n.get(n.node.ops_url + "/readyz"))[0] == 503


@contextlib.contextmanager
def captured(access: bool) -> Iterator[io.StringIO]:
    root, log = logging.getLogger(), logging.getLogger(ACCESS_LOGGER)
    saved = (root.handlers[:], root.level, log.handlers[:], log.level, log.propagate)
    buf = io.StringIO()
    configure_logging("INFO", json_lines=True, stream=buf, access=access)
    try:
        yield buf
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        log.handlers[:], log.level, log.propagate = saved[2], saved[3], saved[4]


async def test_access_log_one_line_per_api_request_without_key_ids(dsn):
    with captured(access=True) as buf:
        async with one_node(dsn, access=True) as n:
            client = n.client()
            raw = await client.chat.completions.with_raw_response.create(
                model=ALIAS, messages=MESSAGES, extra_headers={"x-request-id": "acc-1"}
            )
            served_by = raw.headers["x-backend-id"]
            stream = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, extra_headers={"x-request-id": "acc-2"}
            )
            chunks = [chunk async for chunk in stream]
            assert chunks and all(chunk.usage is None for chunk in chunks)
            await client.models.list(extra_headers={"x-request-id": "acc-3"})
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(
                    model="no-such-model",
                    messages=MESSAGES,
                    extra_headers={"x-request-id": "acc-4"},
                )
            with pytest.raises(openai.AuthenticationError):
                await n.client("sk-" + "x" * 40).chat.completions.create(
                    model=MODEL, messages=MESSAGES, extra_headers={"x-request-id": "acc-5"}
                )
            for path in ("/readyz", "/metrics", "/healthz"):  # probes and scrapes: not logged
                assert (await n.get(n.node.url + path))[0] == 200
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    access = {line["request_id"]: line for line in lines if "route" in line}
    assert sorted(access) == ["acc-1", "acc-2", "acc-3", "acc-4", "acc-5"], lines
    for line in access.values():
        assert list(line) == list(ACCESS_FIELDS)
        assert RFC3339_MS.fullmatch(line["ts"]) and line["node"] == "ops-node"
        assert line["duration_ms"] > 0
    first, second = access["acc-1"], access["acc-2"]
    assert (first["method"], first["route"], first["status"]) == (
        "POST",
        "/v1/chat/completions",
        200,
    )
    assert first["model"] == MODEL  # canonical, though the client named the alias
    assert first["backend"] == n.backends[int(served_by[1:])].url
    assert (first["affinity"], second["affinity"]) == ("miss", "hit")
    assert second["backend"] == first["backend"] and second["status"] == 200
    assert 0 < first["ttft_ms"] <= first["duration_ms"] and second["ttft_ms"] > 0
    assert first["error"] is None
    # the tenant and the tokens: the key by its HMAC, the counts the backend reported
    assert first["key_ref"] == second["key_ref"] == key_ref(n.key_id)
    usage = json.loads(raw.http_response.text)["usage"]
    assert (first["prompt_tokens"], first["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert first["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert (first["stream"], second["stream"]) == (False, True)
    # a stream's usage is asked of vLLM for the log (the client did not ask: it saw none)
    assert second["prompt_tokens"] == usage["prompt_tokens"] and second["completion_tokens"] > 0
    assert second["cached_tokens"] == 0  # "hello" fills no 16-token cache block
    assert first["client"] == second["client"] == "127.0.0.1"
    assert (access["acc-5"]["key_ref"], access["acc-4"]["key_ref"]) == (None, first["key_ref"])
    assert access["acc-3"] | {"ts": 0, "duration_ms": 0} == {
        "ts": 0,
        "node": "ops-node",
        "request_id": "acc-3",
        "method": "GET",
        "route": "/v1/models",
        "model": None,
        "backend": None,
        "status": 200,
        "duration_ms": 0,
        "ttft_ms": None,
        "affinity": None,
        "error": None,
        "key_ref": key_ref(n.key_id),
        "client": "127.0.0.1",
        "stream": None,
        "prompt_tokens": None,
        "cached_tokens": None,
        "completion_tokens": None,
        "trace_id": None,
    }
    assert (access["acc-4"]["status"], access["acc-4"]["error"]) == (404, "model_not_found")
    assert (access["acc-5"]["status"], access["acc-5"]["error"]) == (401, "invalid_api_key")
    text = buf.getvalue()
    assert n.key_id not in text and n.key_id.replace("-", "") not in text
    assert n.secret not in text and "sk-xxxx" not in text


async def test_access_log_client_behind_a_trusted_proxy(dsn):
    forwarded = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9, 127.0.0.1"}
    with captured(access=True) as buf:
        async with one_node(dsn, access=True, trusted_proxies=["127.0.0.0/8"]) as n:
            await n.client().chat.completions.create(
                model=MODEL, messages=MESSAGES, extra_headers={**forwarded, "x-request-id": "p-1"}
            )
        async with one_node(dsn, access=True) as n:  # no trusted proxy: the header is not believed
            await n.client().chat.completions.create(
                model=MODEL, messages=MESSAGES, extra_headers={**forwarded, "x-request-id": "p-2"}
            )
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    access = {line["request_id"]: line for line in lines if "route" in line}
    # the nearest hop the trusted proxies did not add; what the client wrote left of it is not
    assert (access["p-1"]["client"], access["p-2"]["client"]) == ("203.0.113.9", "127.0.0.1")


async def test_access_log_off_by_default(dsn):
    with captured(access=False) as buf:
        async with one_node(dsn) as n:
            await n.client().chat.completions.create(model=MODEL, messages=MESSAGES)
    assert not [line for line in buf.getvalue().splitlines() if '"route"' in line]


async def test_access_log_names_the_key_when_the_operator_opts_in(dsn):
    conn = await asyncpg.connect(dsn)
    try:
        key, secret = await create_key(conn, "team-a")
    finally:
        await conn.close()

    def by_name(cfg: NodeConfig) -> None:
        cfg.logging.access = True
        cfg.logging.key_ref = "name"

    with captured(access=True) as buf:
        async with cluster(dsn, nodes=1, backends=1, configure=by_name) as c:
            node = c.nodes[0]
            refs = node.app[ACCESS_LOG].key_ref  # type: ignore[union-attr]
            await wait_for(lambda: refs(key.id) == "team-a", timeout=10, what="names read")
            await wait_for(partial(knows, node, secret), timeout=10, what="the key")
            await c.client(0, secret).chat.completions.create(
                model=MODEL, messages=MESSAGES, extra_headers={"x-request-id": "named-1"}
            )
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    (line,) = [line for line in lines if line.get("request_id") == "named-1" and "route" in line]
    assert line["key_ref"] == "team-a"
    assert str(key.id) not in buf.getvalue()
