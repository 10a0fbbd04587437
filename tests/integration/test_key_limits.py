"""Fleet-wide per-key limits on a real cluster: 3 in-process nodes sharing one Postgres, fake
vLLM backends, the openai SDK (max_retries=0) as the client.

The rate tests offer twice a key's limit for a warm-up (not counted: the buckets start full and
the shares need a round or two) and then a measured window. What the fleet accepts in that
window must be the limit's share of it within 10 %:

    accepted ~= limit_per_minute * window_s / 60      (120 rpm over 20 s -> 40, so 36..44)

whether the offers go round-robin over the nodes or 90 % to one of them (there the share must
follow the traffic: with equal shares that node would be capped at a third of the limit).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import anthropic
import asyncpg
import openai
import pytest

from affinity_node.http.state import AFFINITY_METRICS, LIMITER
from affinity_node.store.limits import set_limits
from tests.support.cluster import MODEL, Cluster, cluster
from tests.support.waiting import wait_for

WARMUP_S = 3.0
WINDOW_S = 20.0


async def _limit(c: Cluster, key: uuid.UUID, **limits: Any) -> None:
    """Set limits and wait until every node enforces them (a doorbell, then one round)."""
    conn = await asyncpg.connect(c.dsn)
    try:
        await set_limits(
            conn, key, "", limits.get("rpm"), limits.get("tpm"), limits.get("max_concurrent")
        )
    finally:
        await conn.close()

    def everywhere() -> bool:
        for node in c.nodes:
            scopes = node.app[LIMITER].of(key)
            if scopes is None or scopes[""].limits.rpm != (limits.get("rpm") or None):
                return False
        return True

    await wait_for(everywhere, timeout=15.0, what="the limits on every node")


async def _offer(
    clients: list[openai.AsyncOpenAI],
    pick: Callable[[int], int],
    per_s: float,
    duration_s: float,
    **create: Any,
) -> list[tuple[float, int, Any]]:
    """Requests at a steady `per_s` for `duration_s` (each sent on schedule, not after the
    previous answer); returns (sent at, node, answer or the 429 error) for each."""
    start = time.monotonic()
    results: list[tuple[float, int, Any]] = []

    async def one(i: int, at: float) -> None:
        node = pick(i)
        try:
            raw = await clients[node].chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], **create
            )
            results.append((at, node, raw))
        except openai.RateLimitError as exc:
            results.append((at, node, exc))

    tasks = []
    n = int(per_s * duration_s)
    for i in range(n):
        at = i / per_s
        delay = start + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the offered load, not waiting for a condition
        tasks.append(asyncio.ensure_future(one(i, at)))
    await asyncio.gather(*tasks)
    return results


def _accepted(results: list[tuple[float, int, Any]]) -> list[tuple[float, int, Any]]:
    return [r for r in results if r[0] >= WARMUP_S and not isinstance(r[2], Exception)]


async def test_rpm_and_tpm_hold_fleet_wide(dsn: str) -> None:
    """Three keys at once on one 3-node fleet (each key's shares are its own): 120 rpm offered
    round-robin, 120 rpm offered 90 % to node 0, and 3000 tpm. Tokens are charged from an
    estimate (prompt bytes / 4 + max_tokens) and corrected from the answer's usage; what the
    accepted answers used must match the token limit within 15 %."""
    tpm = 3000  # 50 tokens a second
    async with cluster(dsn, nodes=3, backends=2) as c:
        secrets = {name: await c.new_key(name) for name in ("round", "skewed", "tokens")}
        await _limit(c, c.key_ids["round"], rpm=120)
        await _limit(c, c.key_ids["skewed"], rpm=120)
        await _limit(c, c.key_ids["tokens"], tpm=tpm)
        clients = {name: [c.client(i, s) for i in range(3)] for name, s in secrets.items()}
        duration = WARMUP_S + WINDOW_S
        # 2x the request limits (240 a minute = 4 a second); each answer uses about 35 tokens
        # (prompt ~20, 16 out), so 3 a second offers ~2x the token limit.
        round_robin, skewed, tokens = await asyncio.gather(
            _offer(clients["round"], lambda i: i % 3, 4.0, duration, max_tokens=4),
            _offer(
                clients["skewed"],
                lambda i: 0 if i % 20 < 18 else 1 + i % 2,
                4.0,
                duration,
                max_tokens=4,
            ),
            _offer(clients["tokens"], lambda i: i % 3, 3.0, duration, max_tokens=64),
        )
    expected = 120 * WINDOW_S / 60  # 40
    for results in (round_robin, skewed):
        refused = [r for r in results if isinstance(r[2], openai.RateLimitError)]
        assert refused, "twice the limit offered, nothing refused"
        assert {r[2].code for r in refused} == {"rate_limit_exceeded"}
        accepted = _accepted(results)
        assert abs(len(accepted) - expected) <= 0.1 * expected, len(accepted)
    # The share follows the traffic: equal shares would cap node 0 at 40 / 3 ~ 13.
    accepted = _accepted(skewed)
    on_first = sum(1 for r in accepted if r[1] == 0)
    assert on_first >= 0.8 * len(accepted), (on_first, len(accepted))

    used = sum(r[2].parse().usage.total_tokens for r in _accepted(tokens))
    expected_tokens = tpm * WINDOW_S / 60  # 1000
    assert any(isinstance(r[2], openai.RateLimitError) for r in tokens)
    assert abs(used - expected_tokens) <= 0.15 * expected_tokens, used
    first_ok = next(r[2] for r in tokens if not isinstance(r[2], Exception))
    assert first_ok.headers["x-ratelimit-limit-tokens"] == str(tpm)
    assert 0 <= int(first_ok.headers["x-ratelimit-remaining-tokens"]) <= tpm


async def test_max_concurrent_and_headers(dsn: str) -> None:
    """One node (the whole limit is its share): 2 at once pass, the rest get a 429 with
    Retry-After; once they finish, the next one passes. A key without limits gets no
    x-ratelimit headers and is never refused."""
    slow = {"tokens_per_s": 10.0}  # 16 tokens out: 1.6 s per answer
    async with cluster(dsn, nodes=1, backends=1, backend_cfg=slow) as c:
        secret = await c.new_key("conc")
        free = await c.new_key("free")
        await _limit(c, c.key_ids["conc"], rpm=600, max_concurrent=2)
        client = c.client(0, secret)

        async def ask() -> Any:
            try:
                return await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": "x"}]
                )
            except openai.RateLimitError as exc:
                return exc

        answers = await asyncio.gather(*(ask() for _ in range(6)))
        ok = [a for a in answers if not isinstance(a, Exception)]
        refused = [a for a in answers if isinstance(a, openai.RateLimitError)]
        assert (len(ok), len(refused)) == (2, 4)
        for exc in refused:
            assert exc.status_code == 429
            assert exc.code == "rate_limit_exceeded"
            assert int(exc.response.headers["Retry-After"]) >= 1
            assert exc.response.headers["x-ratelimit-limit-requests"] == "600"
        for raw in ok:
            assert raw.headers["x-ratelimit-limit-requests"] == "600"
            assert 0 <= int(raw.headers["x-ratelimit-remaining-requests"]) <= 600
            assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        again = await ask()  # both slots are free again
        assert not isinstance(again, Exception)

        assert c.nodes[0].app[LIMITER].of(c.key_ids["free"]) is None
        plain = await c.client(0, free).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
        assert "x-ratelimit-limit-requests" not in plain.headers
        metrics = c.nodes[0].app[AFFINITY_METRICS].ratelimited
        assert metrics.labels(MODEL, "concurrent")._value.get() == 4


async def test_removed_limits_free_the_key(dsn: str) -> None:
    async with cluster(dsn, nodes=2, backends=1) as c:
        await c.new_key("k")
        key = c.key_ids["k"]
        await _limit(c, key, rpm=5)
        conn = await asyncpg.connect(c.dsn)
        try:
            await set_limits(conn, key, "", 0, None, None)  # 0 removes the limit
        finally:
            await conn.close()
        await wait_for(
            lambda: all(n.app[LIMITER].of(key) is None for n in c.nodes),
            timeout=5.0,
            what="the limits gone everywhere",
        )


async def test_messages_get_anthropics_429_and_streams_are_charged_their_usage(dsn: str) -> None:
    """/v1/messages refuses in Anthropic's shape. A stream's tokens are corrected from the
    usage the node asks the backend for (the client did not ask and sees no usage event)."""
    async with cluster(dsn, nodes=1, backends=1) as c:
        secret = await c.new_key("anth")
        key = c.key_ids["anth"]
        await _limit(c, key, rpm=1, tpm=100_000)
        claude = anthropic.AsyncAnthropic(
            base_url=c.nodes[0].url, api_key=secret, max_retries=0, timeout=30.0
        )
        c.stack.push_async_callback(claude.close)
        messages: Any = [{"role": "user", "content": "hello"}]
        for _ in range(2):  # alone on the key: 2 saved up
            await claude.messages.create(model=MODEL, max_tokens=4, messages=messages)
        with pytest.raises(anthropic.RateLimitError) as err:
            await claude.messages.create(model=MODEL, max_tokens=4, messages=messages)
        assert err.value.status_code == 429
        assert isinstance(err.value.body, dict)
        assert err.value.body["error"]["type"] == "rate_limit_error"
        assert int(err.value.response.headers["Retry-After"]) >= 1

        await _limit(c, key, rpm=0, tpm=60_000)  # 1000 tokens a second, 1000 saved
        scope = c.nodes[0].app[LIMITER].of(key)
        assert scope is not None
        tokens = scope[""].tokens
        assert tokens is not None
        client = c.client(0, secret)
        before = tokens.level
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=900,  # charged ~900 up front; the answer has 16 tokens
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
        assert all(ch.usage is None for ch in chunks)  # not asked for: not shown
        # Corrected to what the backend reported (well under the 900 charged up front).
        assert before - tokens.level < 100, (before, tokens.level)
