"""Fair queueing under saturation (issue 25, item 2).

When every candidate backend of a model is saturated, a new request waits here, in this node's
queue, instead of in a vLLM FIFO queue where a flooding tenant's backlog would sit ahead of
everyone else. Requests leave by fairness: higher priority class first, then the tenant with
the least recent service in tokens (decayed; a queued request is charged when it queues, so a
tenant's tenth queued request sorts behind another tenant's first), then arrival.

Saturated: a backend whose own queue was seen non-empty holds at most the running count it
had then (its slots, as learned from /metrics); it is saturated while its load (running +
waiting + this node's changes since the poll, routing/load_view.py) plus the requests released
to it and not yet sent reaches that capacity. A backend never seen queueing is never saturated.

Work-conserving: a queued request is released whenever some candidate has room, at each of this
node's completions on the model and after each load poll. The request path pays one set lookup
(`model in queue.busy`) while nothing saturates: `busy` is empty.

A request that waits longer than `max_wait_s`, or is pushed out of a full queue, gets 429 when
its tenant holds more than its share of the queue (it is the one flooding), else 503: the
fleet itself is out of room.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from affinity_node.routing.backends import Backend, BackendPool
from affinity_node.routing.load_view import LoadView


@dataclass(frozen=True, slots=True)
class FairRules:
    enabled: bool = True
    max_queue: int = 1000
    """Requests one model's queue holds on this node."""
    max_wait_s: float = 30.0
    """Longest wait in the queue before the request is refused."""
    half_life_s: float = 10.0
    """Recent service halves in this long: what counts as recent."""


class QueueRefused(Exception):
    """A queued request refused: 429 (its tenant holds more than its share) or 503."""

    def __init__(self, status: int, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(order=True, slots=True)
class _Entry:
    sort: tuple[int, float, int]
    key_id: UUID = field(compare=False)
    priority: int = field(compare=False)
    charge: float = field(compare=False)
    arrived: float = field(compare=False)
    future: asyncio.Future[Backend] = field(compare=False)


class _ModelQueue:
    __slots__ = ("entries", "per_key", "released")

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.per_key: dict[UUID, int] = {}
        self.released = 0
        """Releases since the last poll round (the drain rate behind Retry-After)."""


Observer = Callable[[str, int, int], None]
"""(model, priority, change of depth)."""


class FairQueue:
    def __init__(
        self,
        backends: BackendPool,
        view: LoadView,
        rules: FairRules,
        on_depth: Observer | None = None,
        on_wait: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backends = backends
        self._view = view
        self.rules = rules
        self._on_depth = on_depth
        self._on_wait = on_wait
        self._clock = clock
        self._queues: dict[str, _ModelQueue] = {}
        self._service: dict[UUID, tuple[float, float]] = {}
        self._capacity: dict[str, float] = {}
        self._reserved: dict[str, int] = {}
        self._saturated: frozenset[str] = frozenset()
        self._seq = itertools.count()
        self._round_at = clock()
        self.busy: set[str] = set()
        """Models whose requests must queue: saturated, or with a queue already (a newcomer
        must not pass the ones waiting). Empty while nothing saturates."""

    # -- service -----------------------------------------------------------------------------

    def service(self, key_id: UUID) -> float:
        """The tenant's recent service in tokens, decayed to now."""
        found = self._service.get(key_id)
        if found is None:
            return 0.0
        value, at = found
        decay: float = 0.5 ** ((self._clock() - at) / self.rules.half_life_s)
        return value * decay

    def charge(self, key_id: UUID, tokens: float) -> None:
        """Add served (or promised) tokens to the tenant's recent service."""
        self._service[key_id] = (max(0.0, self.service(key_id) + tokens), self._clock())

    def served(self, model: str, key_id: UUID, tokens: float) -> None:
        """A request that did not queue finished while the model was busy: its tokens count,
        and its slot may take a queued request."""
        self.charge(key_id, tokens)
        self.release(model)

    # -- capacity ------------------------------------------------------------------------------

    def learn(self) -> None:
        """After a load poll: each backend's capacity (running, when it had a queue), which
        models are saturated, and release whatever fits now."""
        for backend in self._backends.backends:
            running, waiting = backend.running, backend.waiting
            if running is None:
                continue
            # With a queue of its own it runs at its slots. The largest such reading counts: a
            # poll between a request's arrival and its scheduling reads a queue below the
            # slots, and a capacity set too low would idle the backend while requests wait
            # here (one too high only lets vLLM queue, as without this queue).
            known = self._capacity.get(backend.id)
            if (waiting or known is not None) and running > (known or 0.0):
                self._capacity[backend.id] = running
        models = {m for b in self._backends.backends for m in b.models}
        self._saturated = frozenset(m for m in models if self._free(m) is None)
        self._round_at = self._clock()
        for q in self._queues.values():
            q.released = 0
        self._update_busy()
        for model in list(self._queues):
            self.release(model)

    def _room(self, backend: Backend) -> float:
        cap = self._capacity.get(backend.id)
        if cap is None:
            return math.inf
        return cap - self._view.load(backend) - self._reserved.get(backend.id, 0)

    def _free(self, model: str) -> Backend | None:
        """The candidate with the most room, or None when all are saturated."""
        best: Backend | None = None
        best_room = 0.0
        for backend in self._backends.candidates(model):
            if backend.kind != "vllm" or backend.state != "active":
                continue
            room = self._room(backend)
            if room >= 1.0 and (best is None or room > best_room):
                best, best_room = backend, room
        return best

    def has_room(self, backend: Backend) -> bool:
        return self._room(backend) >= 1.0

    def _update_busy(self) -> None:
        self.busy = set(self._saturated) | {m for m, q in self._queues.items() if q.entries}

    # -- the queue -----------------------------------------------------------------------------

    async def wait(self, key_id: UUID, model: str, priority: int, estimate: int) -> Backend | None:
        """Wait for room, fairly. Returns the backend with room that released the request
        (None: the model turned out not to be saturated); raises QueueRefused."""
        if model not in self._saturated and not self._queues.get(model, _ModelQueue()).entries:
            return None
        free = self._free(model)
        q = self._queues.setdefault(model, _ModelQueue())
        if free is not None and not q.entries:
            self.charge(key_id, estimate)
            return self._reserve(free)
        entry = self._enqueue(q, key_id, model, priority, estimate)
        self.release(model)
        try:
            return await asyncio.wait_for(asyncio.shield(entry.future), self.rules.max_wait_s)
        except TimeoutError:
            got = _result(entry.future)
            if got is not None:  # released at the deadline: take it
                return got
            refused = self._refusal(q, entry, "queue_timeout")
            self._drop(model, q, entry)
            raise refused from None
        except asyncio.CancelledError:  # the client left: its place, or its room, goes back
            got = _result(entry.future)
            if got is not None:
                self.sent(got)
            self._drop(model, q, entry)
            raise

    def _enqueue(
        self, q: _ModelQueue, key_id: UUID, model: str, priority: int, estimate: int
    ) -> _Entry:
        charge = float(estimate)
        self.charge(key_id, charge)  # start-time tag: queued work counts as the tenant's
        entry = _Entry(
            (-priority, self.service(key_id), next(self._seq)),
            key_id,
            priority,
            charge,
            self._clock(),
            asyncio.get_running_loop().create_future(),
        )
        if len(q.entries) >= self.rules.max_queue:
            worst = max(q.entries)
            if worst.sort <= entry.sort:
                self.charge(key_id, -charge)
                raise self._refusal(q, entry, "queue_full", counted=False)
            refused = self._refusal(q, worst, "queue_full", arriving=key_id)
            self._drop(model, q, worst)
            worst.future.set_exception(refused)
        heapq.heappush(q.entries, entry)
        q.per_key[key_id] = q.per_key.get(key_id, 0) + 1
        self.busy.add(model)
        if self._on_depth is not None:
            self._on_depth(model, priority, 1)
        return entry

    def _drop(self, model: str, q: _ModelQueue, entry: _Entry) -> None:
        """Take a request out without serving it: its charge is given back."""
        try:
            q.entries.remove(entry)
        except ValueError:
            return
        heapq.heapify(q.entries)
        self._left(model, q, entry)
        self.charge(entry.key_id, -entry.charge)

    def _left(self, model: str, q: _ModelQueue, entry: _Entry) -> None:
        n = q.per_key.get(entry.key_id, 1) - 1
        if n:
            q.per_key[entry.key_id] = n
        else:
            q.per_key.pop(entry.key_id, None)
        if self._on_depth is not None:
            self._on_depth(model, entry.priority, -1)
        if not q.entries and model not in self._saturated:
            self.busy.discard(model)

    def _refusal(
        self,
        q: _ModelQueue,
        entry: _Entry,
        reason: str,
        counted: bool = True,
        arriving: UUID | None = None,
    ) -> QueueRefused:
        """429 when the tenant holds more than an equal share of the queue (with the request
        `arriving`, if any), else 503. Retry-After: the queue's depth at its drain rate."""
        counts = dict(q.per_key)
        for key in (entry.key_id if not counted else None, arriving):
            if key is not None:
                counts[key] = counts.get(key, 0) + 1
        mine = counts.get(entry.key_id, 0)
        depth = sum(counts.values())
        heavy = len(counts) > 1 and mine > depth / len(counts)
        elapsed = max(self._clock() - self._round_at, 1e-3)
        rate = q.released / elapsed
        wait = depth / rate if rate > 0 else self.rules.max_wait_s
        return QueueRefused(429 if heavy else 503, reason, min(max(wait, 1.0), 60.0))

    def release(self, model: str) -> None:
        """Hand queued requests to backends with room, best first, while any has room."""
        q = self._queues.get(model)
        if q is None or not q.entries:
            return
        while q.entries:
            free = self._free(model)
            if free is None:
                break
            entry = heapq.heappop(q.entries)
            if entry.future.done():
                continue
            self._left(model, q, entry)
            q.released += 1
            if self._on_wait is not None:
                self._on_wait(model, self._clock() - entry.arrived)
            entry.future.set_result(self._reserve(free))

    def _reserve(self, backend: Backend) -> Backend:
        """Room promised to a released request until it is sent (its in-flight count)."""
        self._reserved[backend.id] = self._reserved.get(backend.id, 0) + 1
        return backend

    def sent(self, backend: Backend) -> None:
        """The released request is on its way (counted in flight): its promise ends."""
        n = self._reserved.get(backend.id, 0) - 1
        if n > 0:
            self._reserved[backend.id] = n
        else:
            self._reserved.pop(backend.id, None)

    def depth(self, model: str) -> int:
        q = self._queues.get(model)
        return 0 if q is None else len(q.entries)


def _result(future: asyncio.Future[Backend]) -> Backend | None:
    if future.done() and not future.cancelled() and future.exception() is None:
        return future.result()
    return None
