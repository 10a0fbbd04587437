"""The backend pool against real HTTP servers on 127.0.0.1, and the fallback strategies.

Health rounds are driven with `check_once`, never by sleeping: each call is one round.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from affinity_node.routing.pool import (
    Backend,
    BackendPool,
    BackendSpec,
    ModelSpec,
    normalise_url,
)
from affinity_node.routing.strategies import (
    STRATEGY_NAMES,
    LeastOutstanding,
    RandomChoice,
    RoundRobin,
    make_strategy,
)
from tests.support.waiting import wait_for

LLAMA = ModelSpec("llama-3.1-8b", aliases=("meta-llama/Llama-3.1-8B-Instruct",), affinity=True)
QWEN = ModelSpec("qwen-7b", aliases=("Qwen/Qwen2.5-7B",), affinity=False)


class FakeServer:
    """Serves /health and /v1/models; the test flips what they answer."""

    def __init__(self, models: list[str]) -> None:
        self.models = models
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
        data = [{"id": m, "object": "model", "owned_by": "vllm"} for m in self.models]
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
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def static_pool(*inflight: int, **kwargs: object) -> tuple[BackendPool, list[Backend]]:
    """A pool of backends that all serve llama, with the given in-flight counts."""
    specs = [
        BackendSpec(f"http://10.0.0.{i + 1}:8000", models=["llama-3.1-8b"])
        for i in range(len(inflight))
    ]
    pool = BackendPool(specs, [LLAMA], **kwargs)  # type: ignore[arg-type]
    for backend, n in zip(pool.backends, inflight, strict=True):
        backend.inflight = n
    return pool, list(pool.backends)


# -- discovery ---------------------------------------------------------------------------------


async def test_discovery_maps_aliases_to_canonical_names(
    servers: StartServer, session: aiohttp.ClientSession
) -> None:
    a = await servers(["meta-llama/Llama-3.1-8B-Instruct", "unlisted-model"])
    b = await servers(["llama-3.1-8b"])
    pool = BackendPool(
        [
            BackendSpec(a.url),
            BackendSpec(b.url),
            BackendSpec("http://10.9.9.9:1", models=["Qwen/Qwen2.5-7B"]),
        ],
        [LLAMA, QWEN],
    )
    assert pool.candidates("llama-3.1-8b") == []

    await pool.discover(session)

    ba, bb, bq = pool.backends
    assert ba.models == {"llama-3.1-8b", "unlisted-model"}
    assert bb.models == {"llama-3.1-8b"}
    assert bq.models == {"qwen-7b"}  # configured by alias, stored canonically
    assert bq.discovers is False
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
    servers: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await servers(["llama-3.1-8b"])
    server.models_status = 500
    pool = BackendPool([BackendSpec(server.url)], [LLAMA])

    await pool.discover(session)
    (backend,) = pool.backends
    assert backend.models == frozenset()
    assert backend.last_error is not None and "500" in backend.last_error
    assert pool.candidates("llama-3.1-8b") == []
    assert not pool.has_healthy()  # healthy but serving nothing: the node cannot serve

    server.models_status = 200
    await pool.check_once(session)
    assert backend.models == {"llama-3.1-8b"}
    assert pool.candidates("llama-3.1-8b") == [backend]
    assert pool.has_healthy()

    calls = server.models_calls
    await pool.check_once(session)
    assert server.models_calls == calls  # known models are not asked for every round


async def test_configured_models_are_never_discovered(
    servers: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await servers(["something-else"])
    pool = BackendPool([BackendSpec(server.url, models=["llama-3.1-8b"])], [LLAMA])
    await pool.discover(session)
    await pool.check_once(session)
    assert server.models_calls == 0
    assert pool.backends[0].models == {"llama-3.1-8b"}


# -- active health checks ----------------------------------------------------------------------


async def test_ejected_after_n_failed_checks_and_readmitted_after_m_successes(
    servers: StartServer, session: aiohttp.ClientSession
) -> None:
    a = await servers(["llama-3.1-8b"])
    b = await servers(["llama-3.1-8b"])
    changes: list[tuple[str, bool]] = []
    pool = BackendPool(
        [BackendSpec(a.url), BackendSpec(b.url)],
        [LLAMA],
        eject_after_failures=3,
        readmit_after_successes=2,
        on_health_change=lambda bid, healthy: changes.append((bid, healthy)),
    )
    await pool.discover(session)
    await pool.check_once(session)
    ba, bb = pool.backends
    assert pool.candidates("llama-3.1-8b") == [ba, bb]

    a.health_status = 503
    for _ in range(2):
        await pool.check_once(session)
        assert ba.healthy
    assert ba.consecutive_failures == 2
    assert changes == []
    await pool.check_once(session)
    assert not ba.healthy
    assert changes == [(a.url, False)]
    assert pool.candidates("llama-3.1-8b") == [bb]
    assert pool.candidate_ids("llama-3.1-8b") == (b.url,)

    a.health_status = 200
    await pool.check_once(session)
    assert not ba.healthy  # one success is not enough
    a.health_status = 500
    await pool.check_once(session)  # a failure resets the run of successes
    a.health_status = 200
    await pool.check_once(session)
    assert not ba.healthy
    await pool.check_once(session)
    assert ba.healthy
    assert changes == [(a.url, False), (a.url, True)]
    assert pool.candidates("llama-3.1-8b") == [ba, bb]
    assert bb.healthy and b.health_calls == a.health_calls


async def test_a_stopped_server_is_ejected(
    servers: StartServer, session: aiohttp.ClientSession
) -> None:
    a = await servers(["llama-3.1-8b"])
    b = await servers(["llama-3.1-8b"])
    changes: list[tuple[str, bool]] = []
    pool = BackendPool(
        [BackendSpec(a.url), BackendSpec(b.url)],
        [LLAMA],
        eject_after_failures=2,
        on_health_change=lambda bid, healthy: changes.append((bid, healthy)),
    )
    await pool.check_once(session)
    await a.stop()

    await pool.check_once(session)
    assert pool.backends[0].healthy
    await pool.check_once(session)
    assert not pool.backends[0].healthy
    assert pool.backends[0].last_error is not None
    assert changes == [(a.url, False)]
    assert [x.id for x in pool.candidates("llama-3.1-8b")] == [b.url]
    assert pool.has_healthy()

    await b.stop()
    await pool.check_once(session)
    await pool.check_once(session)
    assert not pool.has_healthy()
    assert pool.candidates("llama-3.1-8b") == []


async def test_a_backend_down_at_start_is_ejected_by_its_first_probe(
    servers: StartServer, session: aiohttp.ClientSession
) -> None:
    up = await servers(["llama-3.1-8b"])
    down = await servers(["llama-3.1-8b"])
    down.health_status = 503
    pool = BackendPool(
        [
            BackendSpec(up.url, models=["llama-3.1-8b"]),
            BackendSpec(down.url, models=["llama-3.1-8b"]),
        ],
        [LLAMA],
    )
    assert pool.has_healthy() and all(b.healthy for b in pool.backends)  # optimistic start
    await pool.check_once(session)
    assert [b.id for b in pool.candidates("llama-3.1-8b")] == [up.url]


async def test_a_health_check_that_hangs_counts_as_failed(
    servers: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await servers(["llama-3.1-8b"])
    pool = BackendPool([BackendSpec(server.url)], [LLAMA], health_timeout_s=0.2)
    await pool.check_once(session)
    server.health_hangs = asyncio.Event()
    await pool.check_once(session)
    (backend,) = pool.backends
    assert backend.consecutive_failures == 1
    assert backend.last_error == "/health timed out"


async def test_readmitted_backend_rediscovers_its_models(
    servers: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await servers(["llama-3.1-8b"])
    pool = BackendPool(
        [BackendSpec(server.url)], [LLAMA, QWEN], eject_after_failures=1, readmit_after_successes=1
    )
    await pool.check_once(session)
    (backend,) = pool.backends
    assert backend.models == {"llama-3.1-8b"}

    server.health_status = 503
    await pool.check_once(session)
    assert not backend.healthy
    server.models = ["Qwen/Qwen2.5-7B"]  # restarted with another model
    server.health_status = 200
    await pool.check_once(session)
    assert backend.healthy
    assert backend.models == {"qwen-7b"}
    assert pool.candidates("llama-3.1-8b") == []
    assert pool.candidates("qwen-7b") == [backend]


async def test_health_loop_runs_rounds_until_cancelled(
    servers: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await servers(["llama-3.1-8b"])
    pool = BackendPool([BackendSpec(server.url)], [LLAMA])
    task = asyncio.create_task(pool.run_health_checks(session, 0.01, eject_after_failures=2))
    try:
        await wait_for(lambda: pool.backends[0].models == {"llama-3.1-8b"})
        server.health_status = 500
        await wait_for(lambda: not pool.backends[0].healthy)
        server.health_status = 200
        await wait_for(lambda: pool.backends[0].healthy)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- passive health ----------------------------------------------------------------------------


async def test_passive_failures_eject_immediately_and_success_breaks_the_run() -> None:
    changes: list[tuple[str, bool]] = []
    pool, (a, b) = static_pool(
        0, 0, eject_after_failures=3, on_health_change=lambda i, h: changes.append((i, h))
    )
    pool.report_failure(a, "connect refused")
    pool.report_failure(a, "502")
    pool.report_success(a)
    pool.report_failure(a, "502")
    pool.report_failure(a, "502")
    assert a.healthy
    pool.report_failure(a, "503")
    assert not a.healthy
    assert a.last_error == "503"
    assert changes == [(a.id, False)]
    assert pool.candidates("llama-3.1-8b") == [b]
    pool.report_success(a)  # a straggler finishing does not re-admit: checks do
    assert not a.healthy


async def test_health_callback_errors_do_not_break_the_pool() -> None:
    def broken(_bid: str, _healthy: bool) -> None:
        raise RuntimeError("metrics exploded")

    pool, (a, b) = static_pool(0, 0, eject_after_failures=1, on_health_change=broken)
    pool.report_failure(a, "502")
    assert not a.healthy
    assert pool.candidates("llama-3.1-8b") == [b]


async def test_run_health_checks_thresholds_apply_to_passive_reports(
    servers: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await servers(["llama-3.1-8b"])
    pool = BackendPool([BackendSpec(server.url)], [LLAMA], eject_after_failures=5)
    with pytest.raises(ValueError, match="eject_after_failures"):
        await pool.run_health_checks(session, 1.0, eject_after_failures=0)
    with pytest.raises(ValueError, match="interval"):
        await pool.run_health_checks(session, 0, eject_after_failures=1)
    task = asyncio.create_task(pool.run_health_checks(session, 60.0, eject_after_failures=1))
    try:
        (backend,) = pool.backends
        await wait_for(lambda: backend.probed)
        assert backend.healthy
        pool.report_failure(backend, "502")
        assert not backend.healthy
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- candidates, affinity, in-flight -----------------------------------------------------------


async def test_candidates_are_a_fresh_list_over_a_cache() -> None:
    pool, (a, b, c) = static_pool(0, 0, 0)
    got = pool.candidates("meta-llama/Llama-3.1-8B-Instruct")
    got.clear()
    assert pool.candidates("llama-3.1-8b") == [a, b, c]
    assert pool.candidate_ids("llama-3.1-8b") is pool.candidate_ids("llama-3.1-8b")
    pool.report_failure(b, "x")
    pool.report_failure(b, "x")
    pool.report_failure(b, "x")
    assert pool.candidates("meta-llama/Llama-3.1-8B-Instruct") == [a, c]
    assert pool.candidate_ids("llama-3.1-8b") == (a.id, c.id)
    for _ in range(3):
        pool.candidate_ids("made-up-by-a-client")
    assert "made-up-by-a-client" not in pool._candidate_ids


async def test_affinity_applies_only_to_vllm_backends_of_affinity_models() -> None:
    pool = BackendPool(
        [
            BackendSpec("http://v:8000", kind="vllm", models=["llama-3.1-8b", "qwen-7b", "x"]),
            BackendSpec("http://e:8000", kind="external", models=["llama-3.1-8b"]),
        ],
        [LLAMA, QWEN],
        default_affinity=False,
    )
    v, e = pool.backends
    assert pool.affinity_applies("llama-3.1-8b", v)
    assert pool.affinity_applies("meta-llama/Llama-3.1-8B-Instruct", v)
    assert not pool.affinity_applies("llama-3.1-8b", e)
    assert not pool.affinity_applies("qwen-7b", v)
    assert not pool.affinity_applies("x", v)  # not in the table: default_affinity
    assert not pool.affinity_applies("unknown", v)


async def test_inflight_counts_until_the_block_ends_even_on_error() -> None:
    pool, (a,) = static_pool(0)
    pool.acquire(a)
    assert a.inflight == 1
    with pool.track(a):
        assert a.inflight == 2
    assert a.inflight == 1
    with pytest.raises(RuntimeError), pool.track(a):
        assert a.inflight == 2
        raise RuntimeError("client went away")
    assert a.inflight == 1
    pool.release(a)
    pool.release(a)
    assert a.inflight == 0


@pytest.mark.parametrize(
    ("inflight", "expected"),
    [
        ((0, 0, 3), False),  # relative excess, but only 2 above the mean of 1: light load
        ((0, 0, 30), True),  # mean 10: 30 > 12.5 and 30 >= 18
        ((10, 10, 12), False),  # 12 > 10.67 * 1.25? no
        ((10, 10, 20), False),  # 20 > 16.7 but 20 < 13.3 + 8
        ((0, 0, 0), False),
        ((0, 0, 12), True),  # mean 4: 12 > 5 and 12 >= 12 (the gap is inclusive)
        ((0, 0, 11), False),  # mean 3.67: 11 < 11.67
    ],
)
async def test_overloaded_needs_relative_and_absolute_excess(
    inflight: tuple[int, ...], expected: bool
) -> None:
    pool, backends = static_pool(*inflight)
    assert pool.overloaded(backends[-1], "llama-3.1-8b", 1.25, 8) is expected
    assert not pool.overloaded(backends[0], "llama-3.1-8b", 1.25, 8)


async def test_overloaded_mean_is_over_healthy_backends_only() -> None:
    pool, (_a, b, c) = static_pool(0, 100, 20)
    assert not pool.overloaded(c, "llama-3.1-8b", 1.25, 8)  # mean 40
    for _ in range(3):
        pool.report_failure(b, "down")
    assert pool.overloaded(c, "llama-3.1-8b", 1.25, 8)  # mean 10: 20 > 12.5 and 20 >= 18
    assert not pool.overloaded(c, "no-such-model", 1.25, 8)


# -- strategies --------------------------------------------------------------------------------


async def test_least_outstanding_picks_the_least_loaded() -> None:
    _pool, (a, b, c) = static_pool(5, 2, 7)
    strategy = LeastOutstanding()
    assert [strategy.choose([a, b, c]) for _ in range(4)] == [b, b, b, b]


async def test_least_outstanding_spreads_ties() -> None:
    _pool, (a, b, c) = static_pool(1, 1, 9)
    strategy = make_strategy("least_outstanding")
    picks = Counter(strategy.choose([a, b, c]).id for _ in range(10))
    assert picks == {a.id: 5, b.id: 5}

    # An idle fleet with in-flight accounting: each new request goes to a different backend.
    pool, backends = static_pool(0, 0, 0)
    chosen = []
    for _ in range(3):
        backend = strategy.choose(backends)
        pool.acquire(backend)
        chosen.append(backend)
    assert set(chosen) == set(backends)


async def test_round_robin_cycles() -> None:
    _pool, (a, b, c) = static_pool(0, 9, 0)
    strategy = make_strategy("round_robin")
    assert isinstance(strategy, RoundRobin)
    assert [strategy.choose([a, b, c]) for _ in range(7)] == [a, b, c, a, b, c, a]


async def test_random_with_seed_is_reproducible_and_stays_in_candidates() -> None:
    _pool, backends = static_pool(0, 0, 0, 0)
    subset = backends[1:]
    first = RandomChoice(seed=42)
    second = make_strategy("random", seed=42)
    run1 = [first.choose(subset) for _ in range(200)]
    run2 = [second.choose(subset) for _ in range(200)]
    assert run1 == run2
    assert set(run1) == set(subset)
    assert backends[0] not in run1


async def test_strategies_reject_empty_candidates_and_unknown_names() -> None:
    assert set(STRATEGY_NAMES) == {"least_outstanding", "round_robin", "random"}
    for name in STRATEGY_NAMES:
        strategy = make_strategy(name)
        assert strategy.name == name
        with pytest.raises(ValueError, match="no candidate"):
            strategy.choose([])
    with pytest.raises(
        ValueError, match=r"unknown routing.fallback strategy 'fastest'.*round_robin"
    ):
        make_strategy("fastest")  # type: ignore[arg-type]


# -- identity and config validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
        ("HTTP://LocalHost:8000//", "http://localhost:8000"),
        ("http://10.0.0.7", "http://10.0.0.7:80"),
        ("https://Example.COM/", "https://example.com:443"),
        ("  http://vllm-0.svc:8000/Prefix/  ", "http://vllm-0.svc:8000/Prefix"),
        ("http://[::1]:9000/", "http://[::1]:9000"),
        ("http://[FE80::1]", "http://[fe80::1]:80"),
    ],
)
async def test_url_normalisation(raw: str, normal: str) -> None:
    assert normalise_url(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "ftp://h:1",
        "localhost:8000",
        "http://",
        "http://u:p@h:1",
        "http://h:1/?a=b",
        "http://h:99999",
    ],
)
async def test_bad_urls_are_rejected(raw: str) -> None:
    with pytest.raises(ValueError, match="backend url"):
        normalise_url(raw)


async def test_backends_are_identified_by_normalised_url() -> None:
    pool = BackendPool([BackendSpec("HTTP://Host:80/", models=["m"])])
    assert pool.get("http://host:80") is pool.backends[0]
    assert pool.backends[0].url == "http://host:80"
    with pytest.raises(ValueError, match="listed twice"):
        BackendPool([BackendSpec("http://h"), BackendSpec("http://H:80/")])


async def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="belongs to both"):
        BackendPool([], [ModelSpec("a", aliases=("x",)), ModelSpec("b", aliases=("x",))])
    with pytest.raises(ValueError, match="belongs to both"):
        BackendPool([], [ModelSpec("a"), ModelSpec("b", aliases=("a",))])
    with pytest.raises(ValueError, match="kind must be one of vllm, external"):
        BackendPool([BackendSpec("http://h", kind="sglang")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eject_after_failures"):
        BackendPool([], eject_after_failures=0)
