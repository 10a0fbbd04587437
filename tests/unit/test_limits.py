"""The per-key limiter's arithmetic, on a store kept in memory between limiters (the exchange
table's semantics: each node's rows, read back by the others). Postgres: test_key_limits."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence

import pytest

from affinity_node.auth.limits import Limiter, Refused, duration
from affinity_node.auth.ports import DemandRow, LimitRow

KEY = uuid.uuid4()


class SharedTable:
    """What affinity_limit_demand and api_key_limits hold, for several limiters."""

    def __init__(self, rows: list[LimitRow]) -> None:
        self.rows = rows
        self.demand: dict[tuple[uuid.UUID, str, str], tuple[float, float]] = {}

    async def all_limits(self) -> list[LimitRow]:
        return list(self.rows)

    async def limits_of(self, key_ids: Sequence[uuid.UUID]) -> list[LimitRow]:
        return [r for r in self.rows if r[0] in key_ids]

    async def exchange(
        self, node_id: str, mine: Sequence[tuple[uuid.UUID, str, float, float]], fresh_s: float
    ) -> list[DemandRow]:
        scopes = {(k, m) for k, m, _, _ in mine}
        out = [
            (k, m, n, r, t)
            for (k, m, n), (r, t) in self.demand.items()
            if n != node_id and (k, m) in scopes
        ]
        for k, m, r, t in mine:
            self.demand[(k, m, node_id)] = (r, t)
        return out

    async def expire(self) -> None:
        pass

    async def leave(self, node_id: str) -> None:
        self.demand = {k: v for k, v in self.demand.items() if k[2] != node_id}


async def test_a_key_without_limits_has_no_scopes_and_a_limited_one_is_refused_past_its_share():
    table = SharedTable([(KEY, "", 60, None, None, None)])
    limiter = Limiter(table, "a")
    await limiter.round()
    assert limiter.of(uuid.uuid4()) is None
    scopes = limiter.of(KEY)
    assert scopes is not None
    for _ in range(2):  # 60 a minute, alone: 1 a second, 2 saved at most
        limiter.finish(limiter.admit(scopes, "m", 10), None)
    with pytest.raises(Refused) as refused:
        limiter.admit(scopes, "m", 10)
    assert refused.value.kind == "rpm"
    assert refused.value.headers["Retry-After"] == "1"
    assert refused.value.headers["x-ratelimit-limit-requests"] == "60"


async def test_the_share_follows_the_demand():
    table = SharedTable([(KEY, "", 6000, None, None, None)])
    a, b = Limiter(table, "a"), Limiter(table, "b")
    for _ in range(3):  # a is offered 9 requests for each of b's
        for limiter, offers in ((a, 9), (b, 1)):
            scopes = limiter.of(KEY) or {}
            for _ in range(offers):
                with contextlib.suppress(Refused):
                    limiter.finish(limiter.admit(scopes, "m", 0), 0)
        await a.round()
        await b.round()
    share_a = (a.of(KEY) or {})[""].share_requests
    share_b = (b.of(KEY) or {})[""].share_requests
    assert share_a == pytest.approx(0.9, abs=0.05)
    assert share_b == pytest.approx(0.1, abs=0.05)


async def test_tokens_charged_up_front_are_corrected_by_the_usage():
    table = SharedTable([(KEY, "", None, 600, None, None)])  # 10 tokens a second, 10 saved
    limiter = Limiter(table, "a")
    await limiter.round()
    scopes = limiter.of(KEY) or {}
    ticket = limiter.admit(scopes, "m", 500)  # far more than saved: admitted into debt
    with pytest.raises(Refused) as refused:
        limiter.admit(scopes, "m", 1)
    assert refused.value.kind == "tpm"
    limiter.finish(ticket, 2)  # it used 2: the rest comes back
    limiter.finish(limiter.admit(scopes, "m", 1), 1)


async def test_concurrency_and_a_model_scope_are_both_checked():
    table = SharedTable([(KEY, "", None, None, 2, None), (KEY, "m1", None, None, 1, None)])
    limiter = Limiter(table, "a")
    await limiter.round()
    scopes = limiter.of(KEY) or {}
    first = limiter.admit(scopes, "m1", 0)
    with pytest.raises(Refused):
        limiter.admit(scopes, "m1", 0)  # m1's own limit
    other = limiter.admit(scopes, "m2", 0)  # the key's limit still has one
    with pytest.raises(Refused) as refused:
        limiter.admit(scopes, "m2", 0)
    assert refused.value.kind == "concurrent"
    limiter.finish(first, None)
    limiter.finish(other, None)
    limiter.finish(limiter.admit(scopes, "m1", 0), None)


async def test_limits_removed_by_a_doorbell_free_the_key():
    table = SharedTable([(KEY, "", 5, None, None, None)])
    limiter = Limiter(table, "a")
    await limiter.round()
    assert limiter.of(KEY) is not None
    table.rows = []
    limiter.key_changed(KEY)
    await limiter.round()
    assert limiter.of(KEY) is None


def test_reset_durations_read_like_openais():
    assert duration(0.25) == "250ms"
    assert duration(1.5) == "1.5s"
    assert duration(360) == "6m0s"


class BrokenTable(SharedTable):
    """The database went away after the first round."""

    broken = False

    async def exchange(
        self, node_id: str, mine: Sequence[tuple[uuid.UUID, str, float, float]], fresh_s: float
    ) -> list[DemandRow]:
        if self.broken:
            raise ConnectionError("database unreachable")
        return await super().exchange(node_id, mine, fresh_s)


async def test_a_database_outage_keeps_the_last_shares_and_the_limit():
    table = BrokenTable([(KEY, "", 60, None, None, None)])
    limiter = Limiter(table, "a")
    await limiter.round()
    table.broken = True
    with pytest.raises(ConnectionError):
        await limiter.round()
    scopes = limiter.of(KEY) or {}
    assert scopes[""].share_requests == 1.0
    for _ in range(2):
        limiter.finish(limiter.admit(scopes, "m", 0), None)
    with pytest.raises(Refused):
        limiter.admit(scopes, "m", 0)


async def test_priority_class_is_learned_without_making_the_key_limited() -> None:
    other = uuid.uuid4()
    table = SharedTable([(KEY, "", None, None, None, 7), (other, "", 60, None, None, None)])
    limiter = Limiter(table, "n1")
    await limiter.round()
    assert limiter.priority(KEY) == 7
    assert limiter.of(KEY) is None, "a class alone costs the request path nothing"
    assert limiter.priority(other) == 0
    table.rows = [(KEY, "", None, None, None, None)]  # the class removed, a doorbell rings
    limiter.key_changed(KEY)
    await limiter.round()
    assert limiter.priority(KEY) == 0
