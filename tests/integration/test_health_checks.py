"""Health checks and model discovery against real HTTP servers on 127.0.0.1.

Rounds are driven with `check_once`, never by sleeping: each call is one round.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from aiohttp import web

from affinity_node.routing.backends import BackendPool, BackendSpec, ModelSpec
from affinity_node.routing.health_state import BackendHealth
from affinity_node.upstream.client import UpstreamClient, UpstreamTimeouts
from affinity_node.upstream.probes import HealthChecker
from tests.support.waiting import wait_for

LLAMA = ModelSpec("llama-3.1-8b", aliases=("meta-llama/Llama-3.1-8B-Instruct",), affinity=True)
QWEN = ModelSpec("qwen-7b", aliases=("Qwen/Qwen2.5-7B",), affinity=False)


class FakeServer:
    """Serves /health and /v1/models; the test flips what they answer."""

    def __init__(self, models: list[str]) -> None:
        self.models = models
        self.adapters: dict[str, str] = {}
        """LoRA adapters it lists: name -> parent (vLLM's shape)."""
        self.models_gate: asyncio.Event | None = None
        """When set, the next /v1/models answer waits for it (then the gate is cleared)."""
        self.health_status = 200
        self.models_status = 200
        self.health_hangs: asyncio.Event | None = None
        self.health_calls = 0
        self.models_calls = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _health(self, _request: web.Request) -> web.Response:
        self.health_calls += 1
        if self.health_hangs is not None:
            await self.health_hangs.wait()
        return web.Response(status=self.health_status)

    async def _models(self, _request: web.Request) -> web.Response:
        self.models_calls += 1
        if self.models_status != 200:
            return web.Response(status=self.models_status, text="boom")
        listing = {m: None for m in self.models} | self.adapters  # what it serves now
        gate, self.models_gate = self.models_gate, None
        if gate is not None:
            await gate.wait()
        data: list[dict[str, Any]] = [
            {"id": m, "object": "model", "owned_by": "vllm", "root": m, "parent": p}
            for m, p in listing.items()
        ]
        return web.json_response({"object": "list", "data": data})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.health_hangs is not None:
            self.health_hangs.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


StartServer = Callable[..., Awaitable[FakeServer]]


@pytest.fixture
async def servers() -> AsyncIterator[StartServer]:
    started: list[FakeServer] = []

    async def start(models: list[str] | None = None) -> FakeServer:
        server = FakeServer(models or [])
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient(UpstreamTimeouts(health_s=0.2))
    yield c
    await c.close()


def make(
    client: UpstreamClient,
    specs: Sequence[BackendSpec],
    models: Sequence[ModelSpec] = (),
    interval_s: float = 1.0,
    **health: Any,
) -> tuple[BackendPool, HealthChecker]:
    pool = BackendPool(specs, models)
    return pool, HealthChecker(pool, BackendHealth(pool, **health), client, interval_s)


# -- discovery ---------------------------------------------------------------------------------


async def test_discovery_maps_aliases_to_canonical_names(
    servers: StartServer, client: UpstreamClient
) -> None:
    a = await servers(["meta-llama/Llama-3.1-8B-Instruct", "unlisted-model"])
    b = await servers(["llama-3.1-8b"])
    pool, checker = make(
        client,
        [
            BackendSpec(a.url),
            BackendSpec(b.url),
            BackendSpec("http://10.9.9.9:1", models=["Qwen/Qwen2.5-7B"]),
        ],
        [LLAMA, QWEN],
    )
    assert pool.candidates("llama-3.1-8b") == []

    await checker.discover()

    ba, bb, bq = pool.backends
    assert ba.models == {"llama-3.1-8b", "unlisted-model"}
    assert bb.models == {"llama-3.1-8b"}
    assert bq.models == {"qwen-7b"}  # configured by alias, stored canonically
    assert bq.configured == {"qwen-7b"} and bq.discovers  # vllm: asked for its adapters
    assert pool.canonical("meta-llama/Llama-3.1-8B-Instruct") == "llama-3.1-8b"
    assert pool.canonical("llama-3.1-8b") == "llama-3.1-8b"
    assert pool.canonical("unlisted-model") == "unlisted-model"
    assert pool.canonical("nope") is None
    assert pool.candidates("meta-llama/Llama-3.1-8B-Instruct") == [ba, bb]
    assert pool.candidate_ids("llama-3.1-8b") == (a.url, b.url)
    assert pool.candidates("unlisted-model") == [ba]
    assert pool.candidates("nope") == []
    assert pool.served_models() == ["llama-3.1-8b", "qwen-7b", "unlisted-model"]


async def test_failed_discovery_is_retried_on_the_next_health_round(
    servers: StartServer, client: UpstreamClient
) -> None:
    server = await servers(["llama-3.1-8b"])
    server.models_status = 500
    pool, checker = make(client, [BackendSpec(server.url)], [LLAMA])

    await checker.discover()
    (backend,) = pool.backends
    assert backend.models == frozenset()
    assert backend.last_error is not None and "500" in backend.last_error
    assert pool.candidates("llama-3.1-8b") == []
    assert not pool.has_healthy()  # healthy but serving nothing: the node cannot serve

    server.models_status = 200
    await checker.check_once()
    assert backend.models == {"llama-3.1-8b"}
    assert pool.candidates("llama-3.1-8b") == [backend]
    assert pool.has_healthy()

    calls = server.models_calls
    await checker.check_once()
    assert server.models_calls == calls  # known models are not asked for every round


async def test_configured_backend_serves_its_models_plus_their_listed_adapters(
    servers: StartServer, client: UpstreamClient
) -> None:
    server = await servers(["llama-3.1-8b", "something-else"])
    server.adapters = {"sql-lora": "llama-3.1-8b", "other-lora": "something-else"}
    external = await servers(["llama-3.1-8b"])
    pool, checker = make(
        client,
        [
            BackendSpec(server.url, models=["llama-3.1-8b"]),
            BackendSpec(external.url, kind="external", models=["llama-3.1-8b"]),
        ],
        [LLAMA],
    )
    await checker.discover()  # start: nothing is waited for, both serve their configured models
    assert server.models_calls == 0
    await checker.discover_all()
    backend, ext = pool.backends
    # A base the config left out is not routed there, nor its adapters.
    assert backend.models == {"llama-3.1-8b", "sql-lora"}
    assert pool.parent_of("sql-lora") == "llama-3.1-8b"
    assert pool.canonical("other-lora") is None and pool.canonical("something-else") is None
    assert external.models_calls == 0  # an external backend with configured models is not asked
    assert ext.models == {"llama-3.1-8b"}


# -- periodic discovery (LoRA adapters at runtime) ---------------------------------------------


async def test_adapters_join_and_leave_with_each_discovery_round(
    servers: StartServer, client: UpstreamClient
) -> None:
    a = await servers(["llama-3.1-8b"])
    b = await servers(["meta-llama/Llama-3.1-8B-Instruct"])
    a.adapters = {"sql-lora": "llama-3.1-8b"}
    pool, checker = make(
        client, [BackendSpec(a.url, models=["llama-3.1-8b"]), BackendSpec(b.url)], [LLAMA]
    )
    await checker.discover_all()
    ba, bb = pool.backends
    assert pool.candidates("sql-lora") == [ba]
    assert pool.served_models() == ["llama-3.1-8b", "sql-lora"]

    # Loaded on b (parent named by alias), unloaded from a.
    b.adapters = {"sql-lora": "meta-llama/Llama-3.1-8B-Instruct"}
    a.adapters = {}
    await checker.discover_all()
    assert pool.candidates("sql-lora") == [bb]
    assert pool.parent_of("sql-lora") == "llama-3.1-8b"
    assert ba.models == {"llama-3.1-8b"}

    b.adapters = {}
    await checker.discover_all()
    assert pool.candidates("sql-lora") == []
    assert pool.canonical("sql-lora") == "sql-lora"  # once listed: known (503, not 404)
    assert pool.served_models() == ["llama-3.1-8b"]


async def test_a_failed_discovery_keeps_what_was_known_and_warns_rate_limited(
    servers: StartServer, client: UpstreamClient, caplog: pytest.LogCaptureFixture
) -> None:
    server = await servers(["llama-3.1-8b"])
    server.adapters = {"sql-lora": "llama-3.1-8b"}
    pool, checker = make(client, [BackendSpec(server.url)], [LLAMA])
    await checker.discover_all()
    (backend,) = pool.backends
    assert backend.models == {"llama-3.1-8b", "sql-lora"}

    server.models_status = 500
    server.adapters = {}
    with caplog.at_level("WARNING", logger="affinity_node.upstream.probes"):
        for _ in range(3):
            await checker.discover_all()
    assert server.models_calls == 4
    assert backend.models == {"llama-3.1-8b", "sql-lora"}
    assert pool.candidates("sql-lora") == [backend]
    warnings = [r for r in caplog.records if "model discovery failed" in r.getMessage()]
    assert len(warnings) == 1

    server.models_status = 200
    await checker.discover_all()
    assert backend.models == {"llama-3.1-8b"}


async def test_an_answer_older_than_the_applied_one_is_dropped(
    servers: StartServer, client: UpstreamClient
) -> None:
    server = await servers(["llama-3.1-8b"])
    server.adapters = {"old-lora": "llama-3.1-8b"}
    pool, checker = make(client, [BackendSpec(server.url, models=["llama-3.1-8b"])], [LLAMA])
    (backend,) = pool.backends
    gate = server.models_gate = asyncio.Event()
    slow = asyncio.create_task(checker.discover_all())  # listing taken: old-lora; then waits
    await wait_for(lambda: server.models_calls == 1, what="the first discovery to arrive")
    server.adapters = {"new-lora": "llama-3.1-8b"}
    await checker.discover_all()  # started later, answered first
    assert backend.models == {"llama-3.1-8b", "new-lora"}
    gate.set()
    await slow
    assert backend.models == {"llama-3.1-8b", "new-lora"}


async def test_discovery_loop_follows_adapters_until_stopped(
    servers: StartServer, client: UpstreamClient
) -> None:
    server = await servers(["llama-3.1-8b"])
    pool, checker = make(client, [BackendSpec(server.url, models=["llama-3.1-8b"])], [LLAMA])
    with pytest.raises(ValueError, match="interval"):
        checker.start_discovery(0)
    task = checker.start_discovery(0.02)
    try:
        (backend,) = pool.backends
        server.adapters = {"sql-lora": "llama-3.1-8b"}
        await wait_for(lambda: pool.candidates("sql-lora") == [backend], what="adapter joins")
        server.adapters = {}
        await wait_for(lambda: pool.candidates("sql-lora") == [], what="adapter leaves")
    finally:
        await task.stop()


# -- active health checks ----------------------------------------------------------------------


async def test_ejected_after_n_failed_checks_and_readmitted_after_m_successes(
    servers: StartServer, client: UpstreamClient
) -> None:
    a = await servers(["llama-3.1-8b"])
    b = await servers(["llama-3.1-8b"])
    changes: list[tuple[str, bool]] = []
    pool, checker = make(
        client,
        [BackendSpec(a.url), BackendSpec(b.url)],
        [LLAMA],
        eject_after_failures=3,
        readmit_after_successes=2,
        on_change=lambda bid, healthy: changes.append((bid, healthy)),
    )
    await checker.discover()
    await checker.check_once()
    ba, bb = pool.backends
    assert pool.candidates("llama-3.1-8b") == [ba, bb]

    a.health_status = 503
    for _ in range(2):
        await checker.check_once()
        assert ba.healthy
    assert ba.consecutive_failures == 2
    assert changes == []
    await checker.check_once()
    assert not ba.healthy
    assert changes == [(a.url, False)]
    assert pool.candidates("llama-3.1-8b") == [bb]
    assert pool.candidate_ids("llama-3.1-8b") == (b.url,)

    a.health_status = 200
    await checker.check_once()
    assert not ba.healthy  # one success is not enough
    a.health_status = 500
    await checker.check_once()  # a failure resets the run of successes
    a.health_status = 200
    await checker.check_once()
    assert not ba.healthy
    await checker.check_once()
    assert ba.healthy
    assert changes == [(a.url, False), (a.url, True)]
    assert pool.candidates("llama-3.1-8b") == [ba, bb]
    assert bb.healthy and b.health_calls == a.health_calls


async def test_a_stopped_server_is_ejected(servers: StartServer, client: UpstreamClient) -> None:
    a = await servers(["llama-3.1-8b"])
    b = await servers(["llama-3.1-8b"])
    changes: list[tuple[str, bool]] = []
    pool, checker = make(
        client,
        [BackendSpec(a.url), BackendSpec(b.url)],
        [LLAMA],
        eject_after_failures=2,
        on_change=lambda bid, healthy: changes.append((bid, healthy)),
    )
    await checker.check_once()
    await a.stop()

    await checker.check_once()
    assert pool.backends[0].healthy
    await checker.check_once()
    assert not pool.backends[0].healthy
    assert pool.backends[0].last_error is not None
    assert changes == [(a.url, False)]
    assert [x.id for x in pool.candidates("llama-3.1-8b")] == [b.url]
    assert pool.has_healthy()

    await b.stop()
    await checker.check_once()
    await checker.check_once()
    assert not pool.has_healthy()
    assert pool.candidates("llama-3.1-8b") == []


async def test_a_backend_down_at_start_is_ejected_by_its_first_probe(
    servers: StartServer, client: UpstreamClient
) -> None:
    up = await servers(["llama-3.1-8b"])
    down = await servers(["llama-3.1-8b"])
    down.health_status = 503
    pool, checker = make(
        client,
        [
            BackendSpec(up.url, models=["llama-3.1-8b"]),
            BackendSpec(down.url, models=["llama-3.1-8b"]),
        ],
        [LLAMA],
    )
    assert pool.has_healthy() and all(b.healthy for b in pool.backends)  # optimistic start
    await checker.check_once()
    assert [b.id for b in pool.candidates("llama-3.1-8b")] == [up.url]


async def test_a_health_check_that_hangs_counts_as_failed(
    servers: StartServer, client: UpstreamClient
) -> None:
    server = await servers(["llama-3.1-8b"])
    pool, checker = make(client, [BackendSpec(server.url)], [LLAMA])
    await checker.check_once()
    server.health_hangs = asyncio.Event()
    await checker.check_once()
    (backend,) = pool.backends
    assert backend.consecutive_failures == 1
    assert backend.last_error == "/health timed out"


async def test_readmitted_backend_rediscovers_its_models(
    servers: StartServer, client: UpstreamClient
) -> None:
    server = await servers(["llama-3.1-8b"])
    pool, checker = make(
        client,
        [BackendSpec(server.url)],
        [LLAMA, QWEN],
        eject_after_failures=1,
        readmit_after_successes=1,
    )
    await checker.check_once()
    (backend,) = pool.backends
    assert backend.models == {"llama-3.1-8b"}

    server.health_status = 503
    await checker.check_once()
    assert not backend.healthy
    server.models = ["Qwen/Qwen2.5-7B"]  # restarted with another model
    server.health_status = 200
    await checker.check_once()
    assert backend.healthy
    assert backend.models == {"qwen-7b"}
    assert pool.candidates("llama-3.1-8b") == []
    assert pool.candidates("qwen-7b") == [backend]


async def test_health_loop_runs_rounds_until_cancelled(
    servers: StartServer, client: UpstreamClient
) -> None:
    server = await servers(["llama-3.1-8b"])
    pool, checker = make(
        client, [BackendSpec(server.url)], [LLAMA], interval_s=0.01, eject_after_failures=2
    )
    task = checker.start()
    try:
        await wait_for(lambda: pool.backends[0].models == {"llama-3.1-8b"})
        server.health_status = 500
        await wait_for(lambda: not pool.backends[0].healthy)
        server.health_status = 200
        await wait_for(lambda: pool.backends[0].healthy)
    finally:
        await task.stop()
        assert task.task.cancelled()


async def test_probe_thresholds_apply_to_request_reports_too(
    servers: StartServer, client: UpstreamClient
) -> None:
    server = await servers(["llama-3.1-8b"])
    pool = BackendPool([BackendSpec(server.url)], [LLAMA])
    health = BackendHealth(pool, eject_after_failures=1)
    with pytest.raises(ValueError, match="interval"):
        HealthChecker(pool, health, client, 0)
    checker = HealthChecker(pool, health, client, 60.0)
    task = checker.start()
    try:
        (backend,) = pool.backends
        await wait_for(lambda: backend.probed)
        assert backend.healthy
        health.request_failed(backend, "502")
        assert not backend.healthy
    finally:
        await task.stop()
        assert task.task.cancelled()
