"""What the proxy does with slow, silent and chatty backends and with clients that stall:
no second generation for a slow one, no blame for a backend that is merely busy, no
hop-by-hop header across, no compression nobody asked for, no slot held for a stalled client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from affinity_node.app import run_node
from affinity_node.config import (
    BackendConfig,
    DatabaseConfig,
    HealthConfig,
    ListenConfig,
    ModelConfig,
    NodeConfig,
    validate,
)
from tests.support.cluster import MODEL, cluster, key_everywhere
from tests.support.waiting import wait_for

MESSAGES = [{"role": "user", "content": "Tell me about prefix caching."}]


def short_timeouts(cfg: NodeConfig) -> None:
    cfg.limits.generation_timeout_seconds = 0.5
    cfg.limits.upstream_read_timeout_seconds = 0.5
    cfg.health.interval_seconds = 3600.0  # request outcomes alone decide health here


def upstream_count(c: Any, code: str) -> float:
    reg = c.nodes[0].metrics_registry
    return sum(
        reg.get_sample_value("affinity_upstream_requests_total", {"backend": b.id, "code": code})
        or 0.0
        for b in c.nodes[0].backends.backends
    )


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
async def test_a_silent_backend_gets_a_504_no_second_generation_and_no_blame(dsn, stream):
    # 30 tokens at 10/s: three seconds before a non-streamed answer; a slow first token too.
    slow = {"tokens_per_s": 10.0, "output_tokens": 30, "ttft_base_s": 2.0}
    async with cluster(dsn, nodes=1, backends=2, backend_cfg=slow, configure=short_timeouts) as c:
        client = c.client(0, await c.new_key("alice"))
        with pytest.raises(openai.APIStatusError) as err:
            if stream:
                s = await client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, stream=True
                )
                async for _ in s:
                    pass
            else:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert err.value.status_code == 504
        assert err.value.body["code"] == "upstream_timeout"
        assert upstream_count(c, "timeout") == 1
        assert sum(b.stats.requests for b in c.backends) == 1  # never retried elsewhere
        assert all(b.healthy and b.consecutive_failures == 0 for b in c.nodes[0].backends.backends)


async def test_a_long_generation_within_the_generation_timeout_is_served(dsn):
    def generous(cfg: NodeConfig) -> None:
        cfg.limits.generation_timeout_seconds = 30.0
        cfg.limits.upstream_read_timeout_seconds = 0.2  # streams only: not this request

    slow = {"tokens_per_s": 20.0, "output_tokens": 20}  # one second of silence, then all
    async with cluster(dsn, nodes=1, backends=1, backend_cfg=slow, configure=generous) as c:
        client = c.client(0, await c.new_key("alice"))
        answer = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert answer.choices[0].message.content


async def test_a_client_that_stops_reading_frees_the_backend_slot(dsn):
    def quick_write_timeout(cfg: NodeConfig) -> None:
        cfg.limits.client_write_timeout_seconds = 0.5

    # A long, fast stream: far more than the socket buffers hold.
    chatty = {"tokens_per_s": 1_000_000.0, "output_tokens": 400_000}
    async with cluster(
        dsn, nodes=1, backends=1, backend_cfg=chatty, configure=quick_write_timeout
    ) as c:
        secret = await c.new_key("alice")
        node = c.nodes[0]
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        body = (
            b'{"model": "' + MODEL.encode() + b'", "stream": true, "max_tokens": 400000, '
            b'"messages": [{"role": "user", "content": "go"}]}'
        )
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + secret.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        await writer.drain()
        backend = node.backends.backends[0]
        await wait_for(lambda: backend.inflight == 1, what="the stream to start")
        # The client never reads: past the write timeout the node drops it.
        await wait_for(
            lambda: backend.inflight == 0, timeout=15, what="the stalled client's slot to be freed"
        )
        await wait_for(
            lambda: c.backends[0].stats.disconnects == 1,
            timeout=5,
            what="the backend to see the upstream request cancelled",
        )
        writer.close()
        reg = node.metrics_registry
        assert (
            reg.get_sample_value(
                "affinity_http_requests_total", {"route": "/v1/chat/completions", "code": "499"}
            )
            == 1
        )
        del reader


class ChattyBackend:
    """Answers with every hop-by-hop header there is, and records what it was sent."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def completion(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        await request.read()
        return web.json_response(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": MODEL,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "hi"},
                    }
                ],
            },
            headers={
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "1",
                "Keep-Alive": "timeout=5",
                "Upgrade": "h2c",
                "TE": "trailers",
                "Trailer": "X-Checksum",
                "Proxy-Authenticate": "Basic",
                "Proxy-Connection": "keep-alive",
                "X-Backend-Id": "chatty",
                "X-End-To-End": "kept",
            },
        )

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completion)
        app.router.add_get("/health", self.health)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"


@pytest.fixture
async def chatty() -> AsyncIterator[ChattyBackend]:
    backend = ChattyBackend()
    await backend.start()
    yield backend
    assert backend.runner is not None
    await backend.runner.cleanup()


async def test_hop_by_hop_headers_stay_behind_and_compression_is_only_on_request(dsn, chatty):
    cfg = NodeConfig(
        node_id="hops",
        listen=ListenConfig(host="127.0.0.1", port=0),
        database=DatabaseConfig(dsn=dsn, statement_timeout_ms=1000, lock_timeout_ms=500),
        health=HealthConfig(interval_seconds=3600.0),
        backends=[BackendConfig(url=chatty.url, models=[MODEL])],
        models=[ModelConfig(name=MODEL)],
    )
    validate(cfg)
    async with run_node(cfg) as node:
        _, secret = await key_everywhere(dsn, [node], "alice")
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            for accept in (None, "gzip"):
                headers = {"Authorization": f"Bearer {secret}"}
                if accept:
                    headers["Accept-Encoding"] = accept
                async with http.post(
                    f"{node.url}/v1/chat/completions",
                    headers=headers,
                    skip_auto_headers=["Accept-Encoding"],
                    json={"model": MODEL, "messages": MESSAGES},
                ) as r:
                    assert r.status == 200
                    names = {h.lower() for h in r.headers}
                    assert not names & {
                        "x-secret-hop",
                        "keep-alive",
                        "upgrade",
                        "te",
                        "trailer",
                        "proxy-authenticate",
                        "proxy-connection",
                    }
                    assert r.headers["X-End-To-End"] == "kept"
                    assert r.headers["x-affinity"] in ("miss", "hit")
        sent = [h.get("Accept-Encoding") for h in chatty.seen]
        assert sent == ["identity", "gzip"]
        assert not any("Authorization" in h for h in chatty.seen)
