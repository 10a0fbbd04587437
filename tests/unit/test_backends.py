"""The backend registry, the health state machine and the fallback strategies: no sockets."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_node.routing.backends import (
    Backend,
    BackendPool,
    BackendSpec,
    ListedModel,
    ModelSpec,
    normalise_url,
)
from affinity_node.routing.health_state import BackendHealth
from affinity_node.routing.strategies import (
    LeastOutstanding,
    RandomChoice,
    RoundRobin,
    make_strategy,
)
from affinity_node.vocabulary import STRATEGY_NAMES

LLAMA = ModelSpec("llama-3.1-8b", aliases=("meta-llama/Llama-3.1-8B-Instruct",), affinity=True)
QWEN = ModelSpec("qwen-7b", aliases=("Qwen/Qwen2.5-7B",), affinity=False)


def static_pool(*inflight: int, **health: Any) -> tuple[BackendPool, BackendHealth, list[Backend]]:
    """A pool of backends that all serve llama, with the given in-flight counts."""
    specs = [
        BackendSpec(f"http://10.0.0.{i + 1}:8000", models=["llama-3.1-8b"])
        for i in range(len(inflight))
    ]
    pool = BackendPool(specs, [LLAMA])
    for backend, n in zip(pool.backends, inflight, strict=True):
        backend.inflight = n
    return pool, BackendHealth(pool, **health), list(pool.backends)


# -- passive health ----------------------------------------------------------------------------


def test_passive_failures_eject_immediately_and_success_breaks_the_run() -> None:
    changes: list[tuple[str, bool]] = []
    pool, health, (a, b) = static_pool(
        0, 0, eject_after_failures=3, on_change=lambda i, h: changes.append((i, h))
    )
    health.request_failed(a, "connect refused")
    health.request_failed(a, "502")
    health.request_succeeded(a)
    health.request_failed(a, "502")
    health.request_failed(a, "502")
    assert a.healthy
    health.request_failed(a, "503")
    assert not a.healthy
    assert a.last_error == "503"
    assert changes == [(a.id, False)]
    assert pool.candidates("llama-3.1-8b") == [b]
    health.request_succeeded(a)  # a straggler finishing does not re-admit: checks do
    assert not a.healthy


def test_health_callback_errors_do_not_break_the_pool() -> None:
    def broken(_bid: str, _healthy: bool) -> None:
        raise RuntimeError("metrics exploded")

    pool, health, (a, b) = static_pool(0, 0, eject_after_failures=1, on_change=broken)
    health.request_failed(a, "502")
    assert not a.healthy
    assert pool.candidates("llama-3.1-8b") == [b]


# -- candidates, affinity, in-flight -----------------------------------------------------------


def test_candidates_are_a_fresh_list_over_a_cache() -> None:
    pool, health, (a, b, c) = static_pool(0, 0, 0)
    got = pool.candidates("meta-llama/Llama-3.1-8B-Instruct")
    got.clear()
    assert pool.candidates("llama-3.1-8b") == [a, b, c]
    assert pool.candidate_ids("llama-3.1-8b") is pool.candidate_ids("llama-3.1-8b")
    health.request_failed(b, "x")
    health.request_failed(b, "x")
    health.request_failed(b, "x")
    assert pool.candidates("meta-llama/Llama-3.1-8B-Instruct") == [a, c]
    assert pool.candidate_ids("llama-3.1-8b") == (a.id, c.id)
    for _ in range(3):
        pool.candidate_ids("made-up-by-a-client")
    assert "made-up-by-a-client" not in pool._candidate_ids


def test_affinity_applies_only_to_vllm_backends_of_affinity_models() -> None:
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


# -- models learned from /v1/models (LoRA adapters) --------------------------------------------


def lora(name: str, parent: str = "llama-3.1-8b") -> ListedModel:
    return ListedModel(name, parent)


def test_configured_backends_serve_their_models_plus_listed_adapters_of_them() -> None:
    pool = BackendPool(
        [
            BackendSpec("http://a:8000", models=["llama-3.1-8b"]),
            BackendSpec("http://b:8000", models=["llama-3.1-8b"]),
            BackendSpec("http://c:8000", models=["llama-3.1-8b"]),
        ],
        [LLAMA, QWEN],
    )
    a, b, c = pool.backends
    assert all(x.discovers and x.configured == {"llama-3.1-8b"} for x in pool.backends)
    listing = [ListedModel("llama-3.1-8b"), lora("sql-lora")]
    assert pool.set_models(a, listing)
    assert not pool.set_models(a, listing)  # unchanged: the candidate caches stay
    assert pool.set_models(b, [ListedModel("meta-llama/Llama-3.1-8B-Instruct"), lora("sql-lora")])
    # c also runs qwen (not configured there) and an adapter of it: neither is routed to c.
    assert not pool.set_models(
        c, [ListedModel("llama-3.1-8b"), ListedModel("Qwen/Qwen2.5-7B"), lora("q-lora", "qwen-7b")]
    )
    assert pool.candidates("sql-lora") == [a, b]
    assert pool.candidates("llama-3.1-8b") == [a, b, c]
    assert pool.candidates("qwen-7b") == [] and pool.canonical("q-lora") is None
    assert pool.parent_of("sql-lora") == "llama-3.1-8b"
    assert pool.parent_of("llama-3.1-8b") is None
    assert pool.served_models() == ["llama-3.1-8b", "sql-lora"]
    # Configured models never leave, whatever the listing says.
    assert pool.set_models(a, [])
    assert a.models == {"llama-3.1-8b"}
    assert pool.candidates("sql-lora") == [b]


def test_unconfigured_backends_serve_everything_they_list() -> None:
    pool = BackendPool([BackendSpec("http://a:8000")], [LLAMA])
    (a,) = pool.backends
    assert a.discovers and a.configured == frozenset()
    pool.set_models(
        a,
        [
            ListedModel("meta-llama/Llama-3.1-8B-Instruct"),
            ListedModel("qwen-7b", parent="qwen-7b"),  # parent = itself: a base model
            lora("sql-lora", "meta-llama/Llama-3.1-8B-Instruct"),
            lora("orphan-lora", "not-listed-base"),
        ],
    )
    assert a.models == {"llama-3.1-8b", "qwen-7b", "sql-lora", "orphan-lora"}
    assert pool.parent_of("sql-lora") == "llama-3.1-8b"  # parent stored canonically
    assert pool.parent_of("qwen-7b") is None
    pool.set_models(a, ["llama-3.1-8b"])  # plain ids are base models
    assert a.models == {"llama-3.1-8b"}


def test_an_adapter_that_left_every_backend_stays_known_but_has_no_candidate() -> None:
    """Known -> 503 no_healthy_backend at the HTTP layer; never listed -> 404."""
    pool, _health, (a, b) = static_pool(0, 0)
    pool.set_models(a, [lora("sql-lora")])
    pool.set_models(b, [lora("sql-lora")])
    assert pool.candidate_ids("sql-lora") == (a.id, b.id)
    pool.set_models(a, [])
    assert pool.candidate_ids("sql-lora") == (b.id,)
    pool.set_models(b, [])
    assert pool.candidates("sql-lora") == []
    assert pool.canonical("sql-lora") == "sql-lora"
    assert pool.canonical("never-listed-lora") is None


def test_an_adapter_on_an_unhealthy_backend_is_no_candidate() -> None:
    pool, health, (a, b) = static_pool(0, 0, eject_after_failures=1)
    pool.set_models(a, [lora("sql-lora")])
    health.request_failed(a, "502")
    assert pool.candidates("sql-lora") == []
    assert pool.candidates("llama-3.1-8b") == [b]


def test_adapters_follow_their_base_models_affinity_unless_configured() -> None:
    pool = BackendPool(
        [BackendSpec("http://v:8000", models=["llama-3.1-8b", "qwen-7b"])],
        [LLAMA, QWEN, ModelSpec("pinned-q-lora", affinity=True)],
        default_affinity=False,
    )
    (v,) = pool.backends
    pool.set_models(
        v, [lora("sql-lora"), lora("q-lora", "qwen-7b"), lora("pinned-q-lora", "qwen-7b")]
    )
    assert pool.affinity_applies("sql-lora", v)  # llama has affinity
    assert not pool.affinity_applies("q-lora", v)  # qwen has not
    assert pool.affinity_applies("pinned-q-lora", v)  # named in models: its own setting


def test_backends_added_at_runtime_discover_like_configured_ones() -> None:
    pool = BackendPool([], [LLAMA])
    vllm = pool.add(BackendSpec("http://v:8000", models=["llama-3.1-8b"]), "registry")
    ext = pool.add(BackendSpec("http://e:8000", kind="external", models=["x"]), "registry")
    bare = pool.add(BackendSpec("http://x:8000", kind="external"), "dns")
    assert vllm.discovers and vllm.configured == {"llama-3.1-8b"}
    assert not ext.discovers
    assert bare.discovers and bare.configured == frozenset()


def test_inflight_never_goes_below_zero() -> None:
    pool, _health, (a,) = static_pool(0)
    pool.acquire(a)
    pool.acquire(a)
    assert a.inflight == 2
    for _ in range(3):
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
def test_overloaded_needs_relative_and_absolute_excess(
    inflight: tuple[int, ...], expected: bool
) -> None:
    pool, _health, backends = static_pool(*inflight)
    assert pool.overloaded(backends[-1], "llama-3.1-8b", 1.25, 8) is expected
    assert not pool.overloaded(backends[0], "llama-3.1-8b", 1.25, 8)


def test_overloaded_mean_is_over_healthy_backends_only() -> None:
    pool, health, (_a, b, c) = static_pool(0, 100, 20)
    assert not pool.overloaded(c, "llama-3.1-8b", 1.25, 8)  # mean 40
    for _ in range(3):
        health.request_failed(b, "down")
    assert pool.overloaded(c, "llama-3.1-8b", 1.25, 8)  # mean 10: 20 > 12.5 and 20 >= 18
    assert not pool.overloaded(c, "no-such-model", 1.25, 8)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["acquire", "release", "fail", "recover", "drain", "disable"]),
            st.integers(0, 3),
        ),
        max_size=60,
    )
)
def test_overloaded_keeps_its_running_mean_exact(steps: list[tuple[str, int]]) -> None:
    """The mean is kept by acquire/release instead of summed per request: after any mix of
    requests, health changes and admin states it answers as a recount would."""
    pool, health, backends = static_pool(
        0, 0, 0, 0, eject_after_failures=1, readmit_after_successes=1
    )
    for op, i in steps:
        b = backends[i]
        if op == "acquire":
            pool.acquire(b)
        elif op == "release":
            pool.release(b)
        elif op == "fail":
            health.request_failed(b, "test")
        elif op == "recover":
            health.probe_succeeded(b)
        else:
            pool.set_state(b, "draining" if op == "drain" else "disabled")
        peers = [p for p in backends if p.healthy and p.state != "disabled"]
        mean = sum(p.inflight for p in peers) / len(peers) if peers else 0.0
        for candidate in backends:
            n = candidate.inflight
            for factor, gap in ((1.0, 0), (1.25, 1)):
                expected = bool(peers) and n > factor * mean and n >= mean + gap
                assert pool.overloaded(candidate, "llama-3.1-8b", factor, gap) is expected


# -- strategies --------------------------------------------------------------------------------


def test_least_outstanding_picks_the_least_loaded() -> None:
    _pool, _health, (a, b, c) = static_pool(5, 2, 7)
    strategy = LeastOutstanding()
    assert [strategy.choose([a, b, c]) for _ in range(4)] == [b, b, b, b]


def test_least_outstanding_spreads_ties() -> None:
    _pool, _health, (a, b, c) = static_pool(1, 1, 9)
    strategy = make_strategy("least_outstanding")
    picks = Counter(strategy.choose([a, b, c]).id for _ in range(10))
    assert picks == {a.id: 5, b.id: 5}

    # An idle fleet with in-flight accounting: each new request goes to a different backend.
    pool, _health, backends = static_pool(0, 0, 0)
    chosen = []
    for _ in range(3):
        backend = strategy.choose(backends)
        pool.acquire(backend)
        chosen.append(backend)
    assert set(chosen) == set(backends)


def test_round_robin_cycles() -> None:
    _pool, _health, (a, b, c) = static_pool(0, 9, 0)
    strategy = make_strategy("round_robin")
    assert isinstance(strategy, RoundRobin)
    assert [strategy.choose([a, b, c]) for _ in range(7)] == [a, b, c, a, b, c, a]


def test_random_with_seed_is_reproducible_and_stays_in_candidates() -> None:
    _pool, _health, backends = static_pool(0, 0, 0, 0)
    subset = backends[1:]
    first = RandomChoice(seed=42)
    second = make_strategy("random", seed=42)
    run1 = [first.choose(subset) for _ in range(200)]
    run2 = [second.choose(subset) for _ in range(200)]
    assert run1 == run2
    assert set(run1) == set(subset)
    assert backends[0] not in run1


def test_strategies_reject_empty_candidates_and_unknown_names() -> None:
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
def test_url_normalisation(raw: str, normal: str) -> None:
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
def test_bad_urls_are_rejected(raw: str) -> None:
    with pytest.raises(ValueError, match="backend url"):
        normalise_url(raw)


def test_backends_are_identified_by_normalised_url() -> None:
    pool = BackendPool([BackendSpec("HTTP://Host:80/", models=["m"])])
    assert pool.get("http://host:80") is pool.backends[0]
    assert pool.backends[0].url == "http://host:80"
    with pytest.raises(ValueError, match="listed twice"):
        BackendPool([BackendSpec("http://h"), BackendSpec("http://H:80/")])


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="belongs to both"):
        BackendPool([], [ModelSpec("a", aliases=("x",)), ModelSpec("b", aliases=("x",))])
    with pytest.raises(ValueError, match="belongs to both"):
        BackendPool([], [ModelSpec("a"), ModelSpec("b", aliases=("a",))])
    with pytest.raises(ValueError, match="kind must be one of vllm, llamacpp, external"):
        BackendPool([BackendSpec("http://h", kind="sglang")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eject_after_failures"):
        BackendHealth(BackendPool([]), eject_after_failures=0)
    with pytest.raises(ValueError, match="readmit_after_successes"):
        BackendHealth(BackendPool([]), readmit_after_successes=0)
