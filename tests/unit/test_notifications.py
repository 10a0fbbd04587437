"""Notifications are untrusted input: what the parser drops, and what the engine refuses to
believe (treating it as an invalidation instead)."""

from __future__ import annotations

import json
import math

import pytest

from affinity_node.routing.ports import BindingEvent
from affinity_node.store.events import parse_binding_event, parse_key_event
from affinity_node.store.memory import MemoryBindingStore
from tests.unit.fakes import B1, B2, KEY, MODEL, PAIR, Chooser, Clock, make_engine, sample


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


@pytest.mark.parametrize(
    ("forged", "reason"),
    [
        (event(version=9 * 10**18), "version"),
        (event(op="delete", version=9 * 10**18), "version"),
        (event(ttl=1e12), "ttl"),
        (event(ttl=-5.0), "ttl"),
        (event(ttl=math.nan), "malformed"),
        (event(sent_at=math.inf), "malformed"),
        (event(backend="http://attacker:8000"), "backend"),
    ],
)
async def test_implausible_events_invalidate_instead_of_pinning(
    forged: BindingEvent, reason: str
) -> None:
    clock = Clock()
    store = MemoryBindingStore(clock)
    engine, reg = make_engine(store, clock)
    await engine.resolve(KEY, MODEL, (B1, B2), lambda c: B1)
    engine.apply_event(forged)
    assert sample(reg, "affinity_notifications_rejected_total", reason=reason) == 1
    assert engine.cache.get(PAIR) is None  # forgotten, not pinned
    res = await engine.resolve(KEY, MODEL, (B1, B2), Chooser())
    assert (res.backend, res.outcome) == (B1, "found_in_db")  # the row decides
    # and a later genuine change still applies (no poisoned tombstone or version)
    engine.apply_event(event(version=engine.cache.max_version + 1, backend=B2))
    assert engine.cache.get(PAIR).backend == B2


async def test_a_plausible_event_is_applied() -> None:
    clock = Clock()
    engine, reg = make_engine(MemoryBindingStore(clock), clock)
    engine.apply_event(event(op="insert", version=3, backend=B1))
    assert engine.cache.get(PAIR).backend == B1
    engine.apply_event(None)  # what the parser hands over for a malformed payload
    assert sample(reg, "affinity_notifications_rejected_total", reason="malformed") == 1
    assert sample(reg, "affinity_notifications_total", op="insert") == 1
