"""The capacity model of the vLLM simulator: what makes overload visible.

A vLLM server runs at most `max_num_seqs` requests at once and queues the others first come,
first served (`vllm:num_requests_waiting`); it admits a request only when its KV-cache blocks
fit (`vllm:kv_cache_usage_perc`); prefill is compute-bound, so the requests prefilling at the
same time share the GPU; and a decode step takes longer the larger the batch. Without these
a simulated backend never queues, and a router that piles a hot tenant on one backend looks
as good as one that spreads it.

`Scheduler` (slots, FIFO, KV blocks) and `PrefillPool` (processor sharing) are pure and take
the time as an argument, so tests drive them step by step; `Engine` binds them to the event
loop with one timer for the whole pool. A request costs a few callbacks, never a polling
loop: the demo runs four backends, three nodes, Postgres and the load generator on 2 cores.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from affinity_node.sim.prefix_cache import BLOCK_SIZE

_EPS = 1e-7
"""Seconds of slack when deciding that a prefill has finished (float sums are inexact)."""


@dataclass(frozen=True)
class CapacityModel:
    """How much one simulated GPU can do; times in seconds."""

    max_running: int = 64
    """Requests running at once (vLLM's max_num_seqs); the others wait, FIFO."""
    prefill_s_per_token: float = 0.00002
    """Compute per uncached prompt token: a lone request prefills at 1/this tokens/s, and k
    requests prefilling at once progress at 1/k of that each."""
    ttft_base_s: float = 0.005
    """Fixed time from admission to the first token besides the prefill (not shared)."""
    decode_tokens_per_s: float = 2000.0
    """Output tokens per second of a request decoding alone."""
    decode_slowdown: float = 0.02
    """A decode step lasts (1 + decode_slowdown * (running - 1)) times the lone step."""
    kv_cache_blocks: int = 2048
    """KV-cache blocks; a running request holds ceil((prompt + output tokens) / block)."""
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError("max_running must be >= 1")
        if self.prefill_s_per_token < 0 or self.ttft_base_s < 0 or self.decode_slowdown < 0:
            raise ValueError("prefill_s_per_token, ttft_base_s and decode_slowdown must be >= 0")
        if self.decode_tokens_per_s <= 0:
            raise ValueError("decode_tokens_per_s must be > 0")
        if self.kv_cache_blocks < 1 or self.block_size < 1:
            raise ValueError("kv_cache_blocks and block_size must be >= 1")

    def decode_step_s(self, batch: int) -> float:
        """One decode step (one token for every running request) with `batch` running."""
        return (1.0 + self.decode_slowdown * max(batch - 1, 0)) / self.decode_tokens_per_s

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(max(tokens, 0) / self.block_size)

    def prefill_s(self, uncached_tokens: int) -> float:
        """Compute seconds of a prefill (its duration when nothing else prefills)."""
        return max(uncached_tokens, 0) * self.prefill_s_per_token


# -- slots and the FIFO queue ---------------------------------------------------------------


@dataclass(eq=False)
class Ticket:
    """One request's place in the scheduler (compared by identity)."""

    blocks: int
    label: str = ""
    """Free text for the owner (the model name, for per-model gauges)."""
    arrival: float = 0.0
    admitted_at: float | None = None


class Scheduler:
    """Running slots and a FIFO waiting queue, vLLM's first-come-first-served policy.

    The head of the queue is admitted when a slot is free and its KV blocks fit next to the
    running requests' (a request larger than the whole cache runs alone). A waiting request
    never overtakes the head, even if it would fit: that is what makes a queue grow behind
    one long prompt on a real server too.
    """

    def __init__(self, max_running: int, kv_cache_blocks: int) -> None:
        self.max_running = max_running
        self.kv_cache_blocks = kv_cache_blocks
        self.waiting: deque[Ticket] = deque()
        self.running: set[Ticket] = set()
        self.used_blocks = 0

    @property
    def kv_usage(self) -> float:
        """Blocks held by running requests over the cache, 0..1 (above 1 only for one
        request larger than the whole cache)."""
        return self.used_blocks / self.kv_cache_blocks

    def submit(self, ticket: Ticket, now: float) -> list[Ticket]:
        """Queues `ticket`; returns the tickets admitted by that (possibly `ticket` itself)."""
        ticket.arrival = now
        self.waiting.append(ticket)
        return self._admit(now)

    def finish(self, ticket: Ticket, now: float) -> list[Ticket]:
        """Frees a running ticket's slot and blocks; returns the tickets admitted next."""
        self.running.remove(ticket)
        self.used_blocks -= ticket.blocks
        return self._admit(now)

    def abandon(self, ticket: Ticket, now: float) -> list[Ticket]:
        """A client went away: leaves the queue, or frees the slot if already admitted."""
        if ticket in self.running:
            return self.finish(ticket, now)
        try:
            self.waiting.remove(ticket)
        except ValueError:
            return []
        return self._admit(now)  # the head may have left: the next one may fit

    def _fits(self, ticket: Ticket) -> bool:
        if len(self.running) >= self.max_running:
            return False
        return not self.running or self.used_blocks + ticket.blocks <= self.kv_cache_blocks

    def _admit(self, now: float) -> list[Ticket]:
        admitted = []
        while self.waiting and self._fits(self.waiting[0]):
            ticket = self.waiting.popleft()
            ticket.admitted_at = now
            self.running.add(ticket)
            self.used_blocks += ticket.blocks
            admitted.append(ticket)
        return admitted


# -- processor-sharing prefill --------------------------------------------------------------


@dataclass(order=True)
class _Entry:
    finish_v: float
    seq: int
    job: Hashable = field(compare=False)


class PrefillPool:
    """Prefill compute shared equally by the jobs in it (processor sharing).

    Virtual time `v` counts the compute seconds each job has received; with k jobs it
    grows at 1/k per second. A job added with w seconds of work finishes when `v` reaches
    its start value + w, so finish order is fixed on arrival and each event costs
    O(log k): no per-job bookkeeping as jobs come and go.
    """

    def __init__(self, now: float = 0.0) -> None:
        self._t = now
        self._v = 0.0
        self._heap: list[_Entry] = []
        self._finish: dict[Hashable, float] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._finish)

    def __contains__(self, job: object) -> bool:
        return job in self._finish

    def add(self, job: Hashable, work_s: float, now: float) -> list[Hashable]:
        """Starts `job` with `work_s` compute seconds; returns jobs that finished before."""
        done = self.advance(now)
        finish_v = self._v + max(work_s, 0.0)
        self._finish[job] = finish_v
        heapq.heappush(self._heap, _Entry(finish_v, next(self._seq), job))
        return done

    def remove(self, job: Hashable, now: float) -> list[Hashable]:
        """Takes an unfinished job out (its client went away); returns jobs that finished."""
        done = self.advance(now)
        self._finish.pop(job, None)  # its heap entry is skipped when it surfaces
        return done

    def remaining_s(self, job: Hashable) -> float:
        """Compute seconds `job` still needs (as of the last event)."""
        return max(self._finish[job] - self._v, 0.0)

    def _head(self) -> _Entry | None:
        while self._heap:
            head = self._heap[0]
            if self._finish.get(head.job) == head.finish_v:
                return head
            heapq.heappop(self._heap)  # removed or stale
        return None

    def _pop_finished(self, done: list[Hashable]) -> None:
        while (head := self._head()) is not None and head.finish_v <= self._v + _EPS:
            heapq.heappop(self._heap)
            del self._finish[head.job]
            done.append(head.job)

    def advance(self, now: float) -> list[Hashable]:
        """Moves time to `now`; returns the jobs that finished by then, in finish order."""
        done: list[Hashable] = []
        self._pop_finished(done)  # added with no work: done without time passing
        while (head := self._head()) is not None and now > self._t:
            k = len(self._finish)
            finish_t = self._t + (head.finish_v - self._v) * k
            if finish_t > now + _EPS:
                self._v += (now - self._t) / k
                self._t = now
                return done
            # The head finishes first: jump to it, then share among one job fewer.
            self._t = max(self._t, finish_t)
            self._v = head.finish_v
            self._pop_finished(done)
        self._t = max(self._t, now)
        return done

    def next_finish(self) -> float | None:
        """When the next job finishes if no job comes or goes before; None when empty."""
        head = self._head()
        if head is None:
            return None
        return self._t + (head.finish_v - self._v) * len(self._finish)


# -- bound to the event loop ----------------------------------------------------------------


class Engine:
    """One backend's scheduler and prefill pool on the running event loop.

    `on_change` is called after every admission and release (the backend refreshes its
    counters there); per-model gauges read `running_with` / `waiting_with` at scrape time.
    """

    def __init__(self, model: CapacityModel, on_change: Callable[[], None] | None = None) -> None:
        self.model = model
        self.scheduler = Scheduler(model.max_running, model.kv_cache_blocks)
        self.pool = PrefillPool()
        self._on_change = on_change
        self._admissions: dict[Ticket, asyncio.Future[None]] = {}
        self._prefills: dict[object, asyncio.Future[None]] = {}
        self._timer: asyncio.TimerHandle | None = None

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_usage(self) -> float:
        return self.scheduler.kv_usage

    def running_with(self, label: str) -> int:
        return sum(1 for t in self.scheduler.running if t.label == label)

    def waiting_with(self, label: str) -> int:
        return sum(1 for t in self.scheduler.waiting if t.label == label)

    def decode_step_s(self) -> float:
        """The current decode step, from the batch running right now."""
        return self.model.decode_step_s(self.running)

    # -- slots ----------------------------------------------------------------------------

    def _admitted(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            future = self._admissions.pop(ticket, None)
            if future is not None and not future.done():
                future.set_result(None)
        if self._on_change is not None:
            self._on_change()

    @asynccontextmanager
    async def slot(
        self, prompt_tokens: int, output_tokens: int, label: str = ""
    ) -> AsyncIterator[Ticket]:
        """Holds a running slot (and the request's KV blocks) for the body of the block;
        waits FIFO for it first. A cancelled waiter leaves the queue."""
        loop = asyncio.get_running_loop()
        ticket = Ticket(self.model.blocks_for(prompt_tokens + output_tokens), label)
        future: asyncio.Future[None] = loop.create_future()
        self._admissions[ticket] = future
        self._admitted(self.scheduler.submit(ticket, loop.time()))
        try:
            await future
        except asyncio.CancelledError:
            self._admissions.pop(ticket, None)
            self._admitted(self.scheduler.abandon(ticket, loop.time()))
            raise
        try:
            yield ticket
        finally:
            self._admitted(self.scheduler.finish(ticket, loop.time()))

    # -- prefill --------------------------------------------------------------------------

    async def prefill(self, uncached_tokens: int) -> None:
        """Returns when this request's share of the prefill compute has done its tokens."""
        work = self.model.prefill_s(uncached_tokens)
        if work <= 0:
            return
        loop = asyncio.get_running_loop()
        job = object()
        future: asyncio.Future[None] = loop.create_future()
        self._prefills[job] = future
        self._finished(self.pool.add(job, work, loop.time()))
        try:
            await future
        except asyncio.CancelledError:
            self._prefills.pop(job, None)
            self._finished(self.pool.remove(job, loop.time()))
            raise

    def _finished(self, jobs: list[Hashable]) -> None:
        for job in jobs:
            future = self._prefills.pop(job, None)
            if future is not None and not future.done():
                future.set_result(None)
        self._arm()

    def _arm(self) -> None:
        """One timer for the whole pool: at the next finish, if nothing changes before."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.pool.next_finish()
        if when is not None:
            self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._finished(self.pool.advance(asyncio.get_running_loop().time()))
