"""Notifications are untrusted input: what the parser drops, and that the engine believes no
payload at all: a notification is a doorbell, and only the rows read after it change the cache."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from prometheus_client import CollectorRegistry

from affinity_node.routing.engine import AffinityEngine
from affinity_node.routing.ports import BindingEvent, Changes, StoreUnavailable
from affinity_node.store.events import parse_binding_event, parse_key_event
from affinity_node.store.memory import MemoryBindingStore
from tests.support.waiting import wait_for
from tests.unit.fakes import B1, B2, B3, KEY, MODEL, PAIR, Chooser, Clock, make_engine, sample


def payload(**over: object) -> str:
    base: dict[str, object] = {
        "op": "update", "api_key_id": str(KEY), "model": MODEL, "provider_url": B2,
        "version": 5, "expires_at": "2026-01-01T00:00:00Z", "ttl": 60.0, "sent_at": 1000.0,
    }  # fmt: skip
    base.update(over)
    return json.dumps(base)


@pytest.mark.parametrize(
    "raw",
    [
        payload().replace("60.0", "NaN"),
        payload().replace("60.0", "Infinity"),
        payload(version=1.5),
        payload(version=True),
        payload(ttl="60"),
        payload(model="m" * 257),
        payload(model=""),
        payload(provider_url=["x"]),
        payload(op="truncate"),
        payload(api_key_id="not-a-uuid"),
        "[" * 100_000,
        "x" * 9000,
        "{}",
        "null",
    ],
)
def test_the_parser_drops_malformed_payloads(raw: str) -> None:
    assert parse_binding_event(raw) is None


def test_the_parser_keeps_what_the_trigger_sends() -> None:
    event = parse_binding_event(payload(ttl=0, op="delete"))
    assert event is not None and event.op == "delete" and event.ttl == 0.0
    assert parse_key_event(json.dumps({"op": "revoke", "id": str(KEY)})) == ("revoke", KEY)
    assert parse_key_event(json.dumps({"op": "drop", "id": str(KEY)})) is None


def event(**over: object) -> BindingEvent:
    fields: dict[str, object] = dict(
        op="update", pair=PAIR, backend=B2, version=5, ttl=60.0, sent_at=1000.0
    )
    fields.update(over)
    return BindingEvent(**fields)  # type: ignore[arg-type]


class CountingStore(MemoryBindingStore):
    """The memory store, counting the catch-up reads doorbells make."""

    catchups = 0

    async def changes_since(self, version: int, limit: int) -> Changes | None:
        self.catchups += 1
        return await super().changes_since(version, limit)


async def bound_to_b1() -> tuple[AffinityEngine, CountingStore, CollectorRegistry, Clock]:
    clock = Clock()
    store = CountingStore(clock)
    engine, reg = make_engine(store, clock)
    res = await engine.resolve(KEY, MODEL, (B1, B2), lambda c: B1)
    assert res.outcome == "created"
    return engine, store, reg, clock


async def answered(engine: AffinityEngine) -> None:
    await wait_for(lambda: not engine.doorbells_pending, what="the doorbell's read")


@pytest.mark.parametrize(
    "forged",
    [
        event(version=6),  # plausible: a known backend, a real TTL, the next version
        event(op="delete", version=6),
        event(op="insert", version=7, backend=B3, fanout=(B2,)),
        event(version=9 * 10**18),
        event(op="delete", version=9 * 10**18),
        event(ttl=1e12, version=6),
        event(ttl=math.nan, sent_at=math.inf, version=6),
        event(backend="http://attacker:8000", version=6),
        event(version=0),
    ],
)
async def test_a_forged_notification_moves_evicts_and_raises_nothing(forged: BindingEvent) -> None:
    engine, store, reg, _ = await bound_to_b1()
    before = engine.cache.get(PAIR)
    newest, watermark = engine.cache.max_version, engine.watermark
    engine.doorbell(forged)
    await answered(engine)
    assert store.catchups == 1  # it rang: the table was read
    after = engine.cache.get(PAIR)
    assert after is not None and (after.backend, after.version) == (B1, before.version)
    assert (engine.cache.max_version, engine.watermark) == (newest, watermark)
    res = await engine.resolve(KEY, MODEL, (B1, B2), Chooser())
    assert (res.backend, res.outcome) == (B1, "hit")  # still a hit: nothing was evicted
    # and a later genuine change still applies (no poisoned tombstone or version ceiling)
    moved = await store.rebind(PAIR, B1, B2, 60.0)
    assert moved is not None
    engine.doorbell(event(version=moved.version, backend=B2))
    await answered(engine)
    assert engine.cache.get(PAIR).backend == B2
    assert sample(reg, "affinity_notify_lag_seconds_count") == 1  # the real one only


async def test_a_burst_of_doorbells_costs_a_few_reads() -> None:
    engine, store, _, _ = await bound_to_b1()
    moved = await store.rebind(PAIR, B1, B3, 60.0)
    assert moved is not None
    for i in range(1000):
        engine.doorbell(event(version=moved.version - i % 3, backend=B3))
    await answered(engine)
    assert store.catchups <= 3
    assert engine.cache.get(PAIR).backend == B3


async def test_a_doorbell_whose_read_fails_is_read_again() -> None:
    engine, store, reg, _ = await bound_to_b1()
    moved = await store.rebind(PAIR, B1, B2, 60.0)
    assert moved is not None
    real, failures = store.changes_since, [1]

    async def hiccup(version: int, limit: int) -> Changes | None:
        if failures[0]:
            failures[0] -= 1
            raise StoreUnavailable("catchup", ConnectionResetError())
        return await real(version, limit)

    store.changes_since = hiccup  # type: ignore[method-assign]
    engine.doorbell(event(version=moved.version, backend=B2))
    await answered(engine)
    assert engine.cache.get(PAIR).backend == B2
    assert sample(reg, "affinity_db_errors_total", operation="catchup") == 1


async def test_a_doorbell_rung_as_the_reader_ends_starts_a_read() -> None:
    """The reader's last read returns and the task ends; its done callback runs a moment later.
    A doorbell rung in between must start a read of its own, not wait for a reader that is
    gone (it then stayed pending for good, and held the watermark back with it)."""
    engine, store, _, _ = await bound_to_b1()
    moved = await store.rebind(PAIR, B1, B2, 60.0)
    assert moved is not None
    real = store.changes_since

    async def read_then_ring(version: int, limit: int) -> Changes | None:
        # Queued now: it runs after the reader's task completes, before its done callback.
        asyncio.get_running_loop().call_soon(engine.doorbell, event(version=moved.version))
        store.changes_since = real  # type: ignore[method-assign]
        return await real(version, limit)

    store.changes_since = read_then_ring  # type: ignore[method-assign]
    engine.doorbell(event(version=moved.version - 1))
    await answered(engine)
    assert store.catchups == 2  # the late doorbell was read, too
    assert engine.cache.get(PAIR).backend == B2


async def test_a_malformed_payload_is_counted_and_reads_nothing() -> None:
    engine, store, reg, _ = await bound_to_b1()
    engine.doorbell(None)  # what the parser hands over for a malformed payload
    assert not engine.doorbells_pending and store.catchups == 0
    assert sample(reg, "affinity_notifications_rejected_total", reason="malformed") == 1
