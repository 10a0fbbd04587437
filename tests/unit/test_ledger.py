"""The usage ledger's counting and flushing on a store in memory: one statement per flush, a
failed batch sent again as it was (same sequence number), bounded memory, a last flush on stop."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from affinity_node.ledger.ledger import LedgerSettings, UsageLedger
from affinity_node.ledger.ports import COUNT_COLUMNS, LedgerRow, LedgerUnavailable
from affinity_node.observability.metrics import AffinityMetrics, LedgerMetrics
from affinity_node.vocabulary import LEDGER_OUTCOMES

MIGRATION = Path(__file__).resolve().parents[2] / "db" / "migrations" / "0004_usage_ledger.sql"
A = uuid.UUID(int=1)
B = uuid.UUID(int=2)
HOUR = 3600.0


class FakeStore:
    """Applies batches like the SQL does (claim the sequence number, then add)."""

    def __init__(self) -> None:
        self.calls: list[tuple[uuid.UUID, int, list[LedgerRow]]] = []
        self.table: dict[tuple[uuid.UUID, str, str, int], list[int]] = {}
        self.last_seq: dict[uuid.UUID, int] = {}
        self.fail: LedgerUnavailable | None = None
        self.lands_then_fails = False
        self.cleanups: list[int | None] = []

    async def add(
        self, writer: uuid.UUID, node_id: str, seq: int, rows: Sequence[LedgerRow]
    ) -> bool:
        self.calls.append((writer, seq, [(k, list(c)) for k, c in rows]))
        if self.fail is not None and not self.lands_then_fails:
            raise self.fail
        claimed = self.last_seq.get(writer, 0) < seq
        if claimed:
            self.last_seq[writer] = seq
            for key, counts in rows:
                row = self.table.setdefault(key, [0] * len(counts))
                for i, v in enumerate(counts):
                    row[i] += v
        if self.fail is not None:
            raise self.fail  # it landed, but the answer was lost
        return claimed

    async def delete_expired(self, older_than_s: float, batch: int) -> int | None:
        return self.cleanups.pop(0)


def make(
    store: FakeStore, clock: list[float] | None = None, **settings: float
) -> tuple[UsageLedger, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = LedgerMetrics(registry, AffinityMetrics(registry).db_errors)
    now = clock if clock is not None else [10 * HOUR + 5]
    ledger = UsageLedger(
        store,
        metrics,
        "node-a",
        LedgerSettings(**settings),  # type: ignore[arg-type]
        clock=lambda: now[0],
    )
    return ledger, registry


def Usage(prompt: int, cached: int, completion: int) -> bytes:
    """A usage object's bytes, as the request path hands them to the ledger."""
    return (
        f'{{"prompt_tokens":{prompt},"total_tokens":{prompt + completion},'
        f'"completion_tokens":{completion},"prompt_tokens_details":{{"cached_tokens":{cached}}}}}'
    ).encode()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels or None) or 0.0


def counts(requests: int, prompt: int, cached: int, completion: int, **outcomes: int) -> list[int]:
    return [requests, prompt, cached, completion, *(outcomes.get(o, 0) for o in LEDGER_OUTCOMES)]


def test_the_columns_are_the_migration_s() -> None:
    sql = MIGRATION.read_text()
    table = sql.split("CREATE TABLE usage_ledger (", 1)[1].split("\n);", 1)[0]
    bigints = re.findall(r"^\s+(\w+)\s+bigint NOT NULL", table, re.M)
    assert tuple(bigints) == COUNT_COLUMNS


async def test_requests_add_up_per_key_model_backend_and_hour() -> None:
    store = FakeStore()
    clock = [10 * HOUR + 5]
    ledger, _ = make(store, clock)
    ledger.record(A, "m", "http://b0", "miss", Usage(100, 0, 10))
    ledger.record(A, "m", "http://b0", "hit", Usage(110, 96, 10))
    ledger.record(A, "m", "http://b0", "fanout", None)  # an answer without usage
    ledger.record(A, "m", "http://b1", "spill", Usage(120, 0, 10))
    ledger.record(B, "m", "http://b0", "bypass", Usage(50, 16, 5))
    clock[0] = 11 * HOUR  # the next hour: a row of its own
    ledger.record(A, "m", "http://b0", "hit", Usage(130, 112, 10))
    assert ledger.pending_rows == 4
    assert await ledger.flush()
    assert len(store.calls) == 1
    assert store.table == {
        (A, "m", "http://b0", 10): counts(3, 210, 96, 20, miss=1, hit=1, fanout=1),
        (A, "m", "http://b1", 10): counts(1, 120, 0, 10, spill=1),
        (B, "m", "http://b0", 10): counts(1, 50, 16, 5, bypass=1),
        (A, "m", "http://b0", 11): counts(1, 130, 112, 10, hit=1),
    }
    sent = [key for key, _ in store.calls[0][2]]
    assert sent == sorted(sent)  # every node locks shared rows in the same order
    assert ledger.pending_rows == 0
    assert await ledger.flush()
    assert len(store.calls) == 1  # nothing counted: no statement


@pytest.mark.parametrize("landed", [False, True])
async def test_a_failed_batch_is_sent_again_as_it_was_and_counts_once(landed: bool) -> None:
    store = FakeStore()
    ledger, registry = make(store)
    ledger.record(A, "m", "b", "hit", Usage(100, 80, 1))
    store.fail = LedgerUnavailable(TimeoutError(), rejected=False)
    store.lands_then_fails = landed  # the statement committed but its answer was lost
    assert not await ledger.flush()
    ledger.record(A, "m", "b", "hit", Usage(100, 90, 1))  # counted meanwhile
    ledger.record(B, "m", "b", "miss", Usage(10, 0, 1))
    assert not await ledger.flush()
    store.fail = None
    assert await ledger.flush()  # the first batch again, alone
    assert [seq for _, seq, _ in store.calls] == [1, 1, 1]
    assert store.calls[0][2] == store.calls[2][2]
    assert await ledger.flush()  # then what was counted meanwhile
    assert [seq for _, seq, _ in store.calls] == [1, 1, 1, 2]
    assert store.table == {
        (A, "m", "b", 10): counts(2, 200, 170, 2, hit=2),
        (B, "m", "b", 10): counts(1, 10, 0, 1, miss=1),
    }
    assert sample(registry, "affinity_db_errors_total", operation="ledger") == 2
    assert sample(registry, "affinity_ledger_writes_total") == 2


async def test_a_batch_the_database_refuses_is_dropped_after_a_few_tries() -> None:
    store = FakeStore()
    ledger, registry = make(store, max_rejections=3)
    ledger.record(A, "m", "b", "hit", Usage(1, 0, 0))
    ledger.record(A, "m", "b", "hit", Usage(1, 0, 0))
    store.fail = LedgerUnavailable(ValueError("check constraint"), rejected=True)
    for _ in range(3):
        assert not await ledger.flush()
    assert ledger.pending_rows == 0
    assert sample(registry, "affinity_ledger_dropped_requests_total", reason="rejected") == 2
    store.fail = None
    ledger.record(A, "m", "b", "hit", Usage(1, 0, 0))
    assert await ledger.flush()
    assert store.table[(A, "m", "b", 10)][0] == 1


async def test_memory_is_bounded_while_the_database_is_away() -> None:
    store = FakeStore()
    ledger, registry = make(store, max_rows=3)
    store.fail = LedgerUnavailable(OSError(), rejected=False)
    for i in range(2):
        ledger.record(uuid.UUID(int=10 + i), "m", "b", "hit", Usage(1, 1, 1))
    assert not await ledger.flush()  # 2 rows wait in the unsent batch
    ledger.record(uuid.UUID(int=20), "m", "b", "hit", Usage(1, 1, 1))  # the 3rd row
    ledger.record(uuid.UUID(int=21), "m", "b", "hit", Usage(1, 1, 1))  # no room
    ledger.record(uuid.UUID(int=20), "m", "b", "hit", Usage(1, 1, 1))  # its row exists
    ledger.digest()
    assert ledger.pending_rows == 3
    assert sample(registry, "affinity_ledger_dropped_requests_total", reason="full") == 1
    assert sample(registry, "affinity_ledger_pending_rows") == 3
    store.fail = None
    assert await ledger.flush() and await ledger.flush()
    assert sum(c[0] for c in store.table.values()) == 4


async def test_stop_writes_what_is_left() -> None:
    store = FakeStore()
    ledger, registry = make(store, flush_interval_s=3600)
    ledger.start()
    ledger.record(A, "m", "b", "hit", Usage(5, 5, 5))
    await ledger.stop()
    assert store.table == {(A, "m", "b", 10): counts(1, 5, 5, 5, hit=1)}
    assert sample(registry, "affinity_ledger_dropped_requests_total", reason="shutdown") == 0


async def test_stop_with_the_database_away_counts_the_loss() -> None:
    store = FakeStore()
    ledger, registry = make(store)
    ledger.record(A, "m", "b", "hit", Usage(5, 5, 5))
    store.fail = LedgerUnavailable(OSError(), rejected=False)
    assert not await ledger.flush()
    ledger.record(B, "m", "b", "hit", Usage(5, 5, 5))
    ledger.record(B, "m", "b", "hit", Usage(5, 5, 5))
    await ledger.stop()
    assert sample(registry, "affinity_ledger_dropped_requests_total", reason="shutdown") == 3


async def test_cleanup_goes_on_while_batches_are_full() -> None:
    store = FakeStore()
    ledger, _ = make(store, cleanup_batch=10)
    store.cleanups = [10, 10, 3]
    assert await ledger.cleanup() == 23
    store.cleanups = [None]  # another node holds the lock
    assert await ledger.cleanup() == 0


async def test_unreported_answers_are_counted() -> None:
    store = FakeStore()
    ledger, registry = make(store)
    ledger.count_unreported()  # the request path found no usage
    ledger.record(A, "m", "b", "hit", b'{"prompt_tokens": "many"}')  # found, not readable
    ledger.record(A, "m", "b", "hit", b'{"prompt_tokens": 7')  # cut short
    assert await ledger.flush()
    assert sample(registry, "affinity_ledger_unreported_total") == 3
    assert store.table[(A, "m", "b", 10)] == counts(2, 0, 0, 0, hit=2)


async def test_usages_are_decoded_in_batches_soon_after_the_request_that_fills_one() -> None:
    store = FakeStore()
    ledger, registry = make(store, digest_every=3)
    unreadable = b'{"prompt_tokens": null}'  # decoding shows in the metric
    for _ in range(2):
        ledger.record(A, "m", "b", "hit", unreadable)
    await asyncio.sleep(0)
    assert sample(registry, "affinity_ledger_unreported_total") == 0  # not a batch yet
    ledger.record(A, "m", "b", "hit", unreadable)
    assert sample(registry, "affinity_ledger_unreported_total") == 0  # not on the request path
    await asyncio.sleep(0)
    assert sample(registry, "affinity_ledger_unreported_total") == 3  # right after it
    ledger.record(A, "m", "b", "hit", Usage(10, 5, 1))
    assert await ledger.flush()  # decodes what is left first
    assert store.table[(A, "m", "b", 10)] == counts(4, 10, 5, 1, hit=4)
