"""The API key cache: refusals from memory, and revocation winning every race, each race
forced deterministically with a store that holds its reads until told."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prometheus_client import CollectorRegistry

from affinity_node.auth.keycache import InvalidKey, KeyCache, KeysUnavailable
from affinity_node.auth.secrets import hash_secret
from affinity_node.observability.metrics import AffinityMetrics
from tests.support.waiting import wait_for
from tests.unit.fakes import MemoryKeyStore, sample

SECRET = "sk-first-key-0000000000000000000000"


def setup(**kw: float) -> tuple[KeyCache, MemoryKeyStore, CollectorRegistry, uuid.UUID]:
    store = MemoryKeyStore()
    key_id = uuid.uuid4()
    store.rows[key_id] = (hash_secret(SECRET), False)
    registry = CollectorRegistry()
    return KeyCache(store, AffinityMetrics(registry), **kw), store, registry, key_id


async def synced(cache: KeyCache) -> None:
    await cache.resync()
    cache.listener_state(True)


async def test_in_sync_a_known_key_and_an_unknown_token_cost_no_read() -> None:
    cache, store, registry, key_id = setup()
    await synced(cache)
    reads = store.reads
    assert await cache.authenticate(SECRET) == key_id
    for i in range(200):
        with pytest.raises(InvalidKey):
            await cache.authenticate(f"sk-random-{i}")
    assert store.reads == reads
    assert sample(registry, "affinity_keys_refused_total", reason="unknown") == 200
    assert sample(registry, "affinity_key_lookups_total", reason="unknown") == 0


async def test_a_create_notification_loads_that_one_key() -> None:
    cache, store, registry, _ = setup()
    await synced(cache)
    new_id, secret = uuid.uuid4(), "sk-created-later-000000000000000000"
    store.rows[new_id] = (hash_secret(secret), False)
    cache.on_event("create", new_id)
    assert await cache.authenticate(secret) == new_id  # waits for the read in flight
    assert sample(registry, "affinity_key_lookups_total", reason="verify") == 1


async def test_a_revocation_during_the_snapshot_is_not_undone_by_it() -> None:
    cache, store, _, key_id = setup()
    store.gate = asyncio.Event()
    resync = asyncio.create_task(cache.resync())
    await store.entered.wait()  # the snapshot has been read from the table: key still active
    store.rows[key_id] = (store.rows[key_id][0], True)
    cache.on_event("revoke", key_id)
    store.gate.set()
    await resync
    cache.listener_state(True)
    with pytest.raises(InvalidKey):
        await cache.authenticate(SECRET)


async def test_a_revocation_during_a_first_lookup_is_not_undone_by_it() -> None:
    cache, store, _, key_id = setup()
    created = store.rows.pop(key_id)
    await cache.resync()  # loaded, but the listener is down: unknown tokens are looked up
    store.rows[key_id] = created  # created while the listener is down
    store.gate = asyncio.Event()
    store.entered.clear()
    first = asyncio.create_task(cache.authenticate(SECRET))
    await store.entered.wait()  # the lookup has read the row: not revoked yet
    store.rows[key_id] = (created[0], True)  # revoked in the table, then notified
    cache.on_event("revoke", key_id)
    store.gate.set()
    with pytest.raises(InvalidKey):
        await first
    store.gate = None
    with pytest.raises(InvalidKey):  # and nothing stale was cached
        await cache.authenticate(SECRET)


async def test_a_key_created_while_blind_is_found_by_a_rate_limited_lookup() -> None:
    cache, store, registry, _ = setup(lookups_per_s=2.0)
    await cache.resync()  # the listener never came up
    new_id, secret = uuid.uuid4(), "sk-created-while-blind-000000000000"
    store.rows[new_id] = (hash_secret(secret), False)
    assert await cache.authenticate(secret) == new_id
    outcomes = []
    for i in range(10):
        try:
            await cache.authenticate(f"sk-random-{i}")
        except InvalidKey:
            outcomes.append("invalid")
        except KeysUnavailable:
            outcomes.append("limited")
    assert outcomes.count("invalid") <= 2 and outcomes.count("limited") >= 8
    assert sample(registry, "affinity_key_lookups_total", reason="unknown") <= 3


async def test_revocations_are_polled_while_the_listener_is_down() -> None:
    cache, store, registry, key_id = setup(blind_grace_s=0.0)
    await synced(cache)
    cache.listener_state(False)
    store.rows[key_id] = (store.rows[key_id][0], True)  # revoked; nobody heard it
    assert await cache.poll_while_blind()
    with pytest.raises(InvalidKey):
        await cache.authenticate(SECRET)
    assert sample(registry, "affinity_key_lookups_total", reason="poll") == 1
    cache.listener_state(True)
    assert not await cache.poll_while_blind()


async def test_a_failing_lookup_is_unavailable_not_invalid() -> None:
    cache, store, registry, _ = setup()

    async def broken(_digest: bytes) -> None:
        raise ConnectionRefusedError("down")

    store.lookup = broken  # type: ignore[assignment,method-assign]
    with pytest.raises(KeysUnavailable):
        await cache.authenticate("sk-anything-00000000000000")
    await wait_for(
        lambda: sample(registry, "affinity_keys_refused_total", reason="unavailable") == 1
    )


async def test_a_forged_revocation_never_refuses_a_live_key_and_a_real_one_does() -> None:
    cache, store, registry, key_id = setup()
    await synced(cache)
    store.gate = asyncio.Event()  # the table's answer is slow to come
    store.entered.clear()
    cache.on_event("revoke", key_id)  # nobody revoked it in the table
    # Nothing changes before the row is read: the key is served from memory meanwhile.
    assert await cache.authenticate(SECRET) == key_id
    await store.entered.wait()
    store.gate.set()
    await wait_for(lambda: sample(registry, "affinity_key_lookups_total", reason="verify") == 1)
    assert await cache.authenticate(SECRET) == key_id
    store.gate = None
    store.rows[key_id] = (store.rows[key_id][0], True)  # now really revoked
    cache.on_event("revoke", key_id)
    await wait_for(lambda: len(cache) == 0, what="the real revocation")
    with pytest.raises(InvalidKey):
        await cache.authenticate(SECRET)


async def test_a_flood_of_forged_creates_costs_a_few_batched_reads() -> None:
    cache, store, _, key_id = setup()
    await synced(cache)
    reads = store.reads
    for _ in range(5000):
        cache.on_event("create", uuid.uuid4())  # no such keys
    await wait_for(lambda: not getattr(cache, "_pending", None), timeout=10, what="the checks")
    assert store.reads - reads <= 6  # 5 batches of 1000, not 5000 reads
    assert await cache.authenticate(SECRET) == key_id  # and the live key never went away
    assert len(cache) == 1


async def test_a_key_created_during_a_database_hiccup_is_read_again_until_it_lands() -> None:
    cache, store, _, _ = setup()
    await synced(cache)
    new_id, secret = uuid.uuid4(), "sk-created-in-a-hiccup-00000000000"
    store.rows[new_id] = (hash_secret(secret), False)
    failures = [2]
    real_one, real_many = store.load, store.load_many

    async def hiccup() -> None:
        if failures[0]:
            failures[0] -= 1
            raise ConnectionResetError("hiccup")

    async def load(key_id: uuid.UUID) -> tuple[bytes, bool] | None:
        await hiccup()
        return await real_one(key_id)

    async def load_many(key_ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[bytes, bool]]:
        await hiccup()
        return await real_many(key_ids)

    store.load, store.load_many = load, load_many  # type: ignore[method-assign]
    cache.on_event("create", new_id)
    await wait_for(lambda: failures[0] == 0, what="the hiccup")

    async def usable() -> bool:
        try:
            return await cache.authenticate(secret) == new_id
        except InvalidKey:
            return False

    await wait_for(usable, timeout=5, what="the key, read again after the hiccup")


async def test_a_periodic_resync_finds_a_key_whose_notification_was_lost() -> None:
    cache, store, _, _ = setup(resync_interval_s=0.05)
    await synced(cache)
    new_id, secret = uuid.uuid4(), "sk-never-notified-0000000000000000"
    store.rows[new_id] = (hash_secret(secret), False)  # its notification never came
    with pytest.raises(InvalidKey):
        await cache.authenticate(secret)
    await wait_for(cache.maintain, timeout=5, what="a periodic resync")
    assert await cache.authenticate(secret) == new_id


async def test_a_create_notified_as_the_checker_ends_is_read() -> None:
    """The checker's last read returns and its task ends; its done callback runs a moment
    later. A notification in between must start a checker of its own."""
    cache, store, _, _ = setup()
    await synced(cache)
    late_id, secret = uuid.uuid4(), "sk-created-as-checker-ends-00000000"
    store.rows[late_id] = (hash_secret(secret), False)
    real = store.load_many

    async def read_then_notify(key_ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[bytes, bool]]:
        # Queued now: it runs after the checker's task completes, before its done callback.
        asyncio.get_running_loop().call_soon(cache.on_event, "create", late_id)
        store.load_many = real  # type: ignore[method-assign]
        return await real(key_ids)

    store.load_many = read_then_notify  # type: ignore[method-assign]
    cache.on_event("create", uuid.uuid4())  # a key nobody holds: one read
    await wait_for(lambda: not getattr(cache, "_pending", None), timeout=5, what="the checks")
    assert await cache.authenticate(secret) == late_id
