"""Fair queueing under saturation (issue 25, item 2).

When the backends of a model are full, a new request waits here, in this node's queue, instead
of in a vLLM FIFO queue where a flooding tenant's backlog would sit ahead of everyone else.
Requests leave by fairness: higher priority class first, then the tenant with the least recent
service in tokens (decayed; a queued request is charged when it queues, so a tenant's tenth
queued request sorts behind another tenant's first), then arrival.

Capacity: a backend whose own queue was seen non-empty holds at most the running count it had
then (its slots, as learned from /metrics). Its room is that capacity less its load (running +
waiting at the last poll, plus this node's changes since, routing/load_view.py) less the
requests released to it and not yet sent. A backend never seen queueing is taken for as large
as its largest peer that did (and one more than the most it ran, so a larger one is found: a
heavy request's slot); with no such peer its room is unlimited.

Guarded: once a poll finds a model's room nearly gone, every request of it passes through
`wait` (which sends it at once while there is room) until a poll finds the model half empty.
A model that was only checked at poll time would let a whole poll interval of a flood into
the vLLM queues each time a poll saw room. The request path of an unguarded model pays one set
lookup (`model in queue.busy`).

Reserve: `reserve` slots of each guarded model are kept for tenants at or under their fair
share of recent service (the mean over the tenants served lately); a tenant above it (the one
flooding) only takes room beyond the reserve. A small tenant's request then starts at once
instead of waiting for the next completion, which is what keeps its time to first token at its
solo value; the price is `reserve` idle slots while a flood waits. With tenants sharing equally
nobody is above the mean and the queue is work-conserving. A lone tenant is above the share a
newcomer would leave it (the mean counts at least two tenants), so it leaves the reserve too: a
node that has not yet heard of the newcomer (the exchange is once a second) would otherwise
take the lone tenant for light and fill every slot the newcomer's node frees.

Releases happen at each of this node's completions on the model and after each load poll.
Room a poll shows is seen by every node at once: filled by all of them, it went into the vLLM
queues (a small tenant then waited behind the surplus). So a heavy tenant's request is admitted
only while this node holds fewer than its quota of the model's slots: a max-min fair split of
the capacity less the reserve over the nodes' demands (queued and in flight, exchanged about
once a second; 1/nodes alive before the first exchange), in whole slots. The node counts its
own requests exactly, the quotas add up to the capacity less the reserve, and no poll's
staleness can over-commit the model. The room a poll shows above the reserve is split the same
way: between polls a node's heavy requests take only its part of it, so the nodes together
never take the reserve's slots that the small tenants' requests are then sent to. Light
requests, which may take any room, go to the backends in a different order on each node
(by node id), so two nodes that each see one free slot on each backend use different ones.
Recent service is exchanged as the demands are: a tenant's service is its service on every
node, so a node that sees only the flood still knows it is the heavy one.

A request that waits longer than `max_wait_s`, or is pushed out of a full queue, gets 429 when
its tenant holds more than its share of the queue or is heavy among other tenants served lately
(it is the one flooding, though alone in the queue while the others pass at once), else 503:
the fleet itself is out of room.
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
    reserve: int = 1
    """Slots of a guarded model that only tenants at or under their fair share may take."""


SERVICE_SCOPE = "~fair-service"
"""The scope of a tenant's recent-service row in the nodes' exchange (not a model name)."""
FLEET_STALE_S = 5.0
"""Other nodes' demands older than this are not used: an equal split instead."""
DEMAND_KEY = UUID(int=1)
"""The key of a node's demand rows in the exchange (one per model; UUID(int=0) is the
limiter's heartbeat)."""


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
        nodes: Callable[[], int] = lambda: 1,
        node_id: str = "",
    ) -> None:
        """`nodes`: how many nodes are alive (the limits exchange's heartbeats); `node_id`:
        this node's name in the exchange (it breaks ties when slots are split)."""
        self._backends = backends
        self._node_id = node_id
        self._view = view
        self.rules = rules
        self._on_depth = on_depth
        self._on_wait = on_wait
        self._clock = clock
        self._nodes = nodes
        self._queues: dict[str, _ModelQueue] = {}
        self._service: dict[UUID, tuple[float, float]] = {}
        self._fleet_service: dict[UUID, float] = {}
        """Other nodes' recent service per tenant, as of `_fleet_at`."""
        self._fleet_demand: dict[str, dict[str, float]] = {}
        """Other nodes' demands (queued + in flight) per guarded model."""
        self._fleet_at: float | None = None
        self._published: dict[str, float] = {}
        """This node's demand as last told to the others: its share is taken from figures of
        the same moment as theirs (with its current demand against their older figures,
        every node's share grew while queues grew, and the quotas ate the reserve)."""
        self._capacity: dict[str, float] = {}
        """Confirmed: the running count of a backend seen with a queue of its own."""
        self._estimated: dict[str, float] = {}
        """A backend never seen queueing whose peers were: their capacity, or one more than its
        own largest running count (it grows while the backend runs full without a queue)."""
        self._probing: set[str] = set()
        """Estimated backends whose estimate is the probe (one more than the most it ran): that
        slot is room for heavy requests only. A light request sent into it when the backend
        was no larger after all waited a whole completion in the vLLM queue (0.19 s in the
        noisy demo against 35 ms solo)."""
        self._seen: dict[str, float] = {}
        self._reserved: dict[str, int] = {}
        self._guarded: frozenset[str] = frozenset()
        self._share = math.inf
        self._tenants = 0
        """How many tenants the fair share was taken over."""
        """The fair share of recent service (the mean over tenants served lately), as of the
        last poll: a tenant above it is heavy and does not take the reserve."""
        self._seq = itertools.count()
        self._round_at = clock()
        self.busy: set[str] = set()
        """Models whose requests pass through `wait`: guarded, or with a queue (a newcomer
        must not pass the ones waiting). Empty while nothing is near saturation."""

    # -- service -----------------------------------------------------------------------------

    def _decay(self, since: float) -> float:
        decay: float = 0.5 ** ((self._clock() - since) / self.rules.half_life_s)
        return decay

    def local_service(self, key_id: UUID) -> float:
        """The tenant's recent service on this node in tokens, decayed to now."""
        found = self._service.get(key_id)
        if found is None:
            return 0.0
        value, at = found
        return value * self._decay(at)

    def service(self, key_id: UUID) -> float:
        """The tenant's recent service fleet-wide: this node's, and the others' as of the
        last exchange."""
        mine = self.local_service(key_id)
        theirs = self._fleet_service.get(key_id)
        if theirs is None or self._fleet_at is None:
            return mine
        return mine + theirs * self._decay(self._fleet_at)

    def charge(self, key_id: UUID, tokens: float) -> None:
        """Add served (or promised) tokens to the tenant's recent service."""
        self._service[key_id] = (max(0.0, self.local_service(key_id) + tokens), self._clock())

    def served(self, model: str, key_id: UUID, tokens: float) -> None:
        """A request that did not queue finished while the model was busy: its tokens count,
        and its slot may take a queued request."""
        self.charge(key_id, tokens)
        self.release(model)

    # -- capacity ------------------------------------------------------------------------------

    def learn(self) -> None:
        """After a load poll: each backend's capacity (running, when it had a queue), which
        models are guarded, the fair share, and release whatever fits now."""
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
            self._seen[backend.id] = max(self._seen.get(backend.id, 0.0), running)
        self._estimate_unconfirmed()
        models = {m for b in self._backends.backends for m in b.models}
        self._guarded = frozenset(m for m in models if self._guard(m))
        self._share = self._fair_share()
        self._round_at = self._clock()
        for q in self._queues.values():
            q.released = 0
        self._update_busy()
        for model in list(self._queues):
            self.release(model)

    def _estimate_unconfirmed(self) -> None:
        """An idle peer of a flooded backend had unlimited room: every node spilled the flood
        into it until it queued too, and the small tenants waited behind that queue."""
        for backend in self._backends.backends:
            if backend.id in self._capacity:
                self._estimated.pop(backend.id, None)
                self._probing.discard(backend.id)
                continue
            peers = [
                self._capacity[b.id]
                for b in self._backends.backends
                if b.id in self._capacity and b.models & backend.models
            ]
            if peers:
                probe = self._seen.get(backend.id, 0) + 1
                self._estimated[backend.id] = max(max(peers), probe)
                if probe > max(peers):
                    self._probing.add(backend.id)
                else:
                    self._probing.discard(backend.id)

    def _cap(self, backend: Backend) -> float | None:
        """The backend's capacity, confirmed or estimated; None: unlimited as far as known."""
        cap = self._capacity.get(backend.id)
        return self._estimated.get(backend.id) if cap is None else cap

    def _guard(self, model: str) -> bool:
        """Guarded from when the room of the backends with a known or estimated capacity falls
        under a quarter of it (plus the reserve) until their load falls under half of it:
        between polls, requests of a guarded model are admitted one by one against the room
        left. A member with no capacity at all does not count: one backend flooded through a
        tenant's binding guards the model while its peer is idle, and the queue spills the
        flood to the peer."""
        capacity = load = 0.0
        for backend in self._members(model):
            cap = self._cap(backend)
            if cap is not None:
                capacity += cap
                load += self._view.load(backend) + self._reserved.get(backend.id, 0)
        if capacity <= 0:
            return False
        if model in self._guarded:
            return load >= capacity / 2
        return capacity - load < capacity / 4 + self.rules.reserve + 1

    def _fair_share(self) -> float:
        for key, (value, at) in list(self._service.items()):
            if value * self._decay(at) < 1.0:
                del self._service[key]  # forgotten: nothing recent
        values = [self.service(k) for k in self._service.keys() | self._fleet_service.keys()]
        values = [v for v in values if v >= 1.0]
        self._tenants = len(values)
        return sum(values) / max(len(values), 2) if values else math.inf

    # -- the fleet (about once a second, through the database) --------------------------------

    def fleet_rows(self) -> list[tuple[UUID, str, float, float]]:
        """What this node tells the others: (key, SERVICE_SCOPE, 0, recent service) per tenant
        served lately, (DEMAND_KEY, model, demand, 0) per guarded or queueing model."""
        rows = [
            (key, SERVICE_SCOPE, 0.0, value * self._decay(at))
            for key, (value, at) in self._service.items()
        ]
        rows = [r for r in rows if r[3] >= 1.0]
        self._published = {
            m: float(self._demand(m))
            for m in self._guarded | {m for m, q in self._queues.items() if q.entries}
        }
        rows.extend((DEMAND_KEY, m, d, 0.0) for m, d in sorted(self._published.items()))
        return rows

    def fleet_update(self, rows: list[tuple[UUID, str, str, float, float]]) -> None:
        """The other nodes' rows (key, scope, node, requests, tokens), fresh ones only."""
        service: dict[UUID, float] = {}
        demand: dict[str, dict[str, float]] = {}
        for key, scope, node, requests, tokens in rows:
            if key == DEMAND_KEY:
                demand.setdefault(scope, {})[node] = requests
            elif scope == SERVICE_SCOPE:
                service[key] = service.get(key, 0.0) + tokens
        self._fleet_service, self._fleet_demand = service, demand
        self._fleet_at = self._clock()

    def _demand(self, model: str) -> int:
        return self.depth(model) + self._held(model)

    def _held(self, model: str) -> int:
        """This node's requests on the model's backends: in flight, or released and not sent."""
        return sum(b.inflight + self._reserved.get(b.id, 0) for b in self._members(model))

    def quota(self, model: str) -> float:
        """Slots of the model this node's heavy requests may hold: a max-min fair split of the
        capacity less the reserve over the nodes' demands as published, in whole slots (every
        node computes the same split from the same rows; under a flood every node's demand
        exceeds its part and each gets an equal one, the odd slots to the first node ids)."""
        room = self._quota_room(model)
        if room is None:
            return math.inf  # a member of unknown capacity: nothing to divide
        return self._part(model, room)

    def _part(self, model: str, room: float) -> float:
        """This node's part of `room` slots of the model, split as `quota` says."""
        if self._fleet_at is None or self._clock() - self._fleet_at > FLEET_STALE_S:
            return room / max(self._nodes(), 1)  # no exchange lately (the database is away)
        demands = dict(self._fleet_demand.get(model, {}))
        demands[self._node_id] = self._published.get(model, 0.0)
        return _split(math.floor(room), demands)[self._node_id]

    def _quota_room(self, model: str) -> float | None:
        """The slots the quotas split: the members' capacity less the reserve (None: a
        member of unknown capacity). Without an estimated backend's probe slot: counted in,
        the quotas added up to one slot more than the fleet has above the reserve, and the
        flood held a reserve slot whenever both nodes were at their quotas (97% of what the
        small tenants left, in the noisy demo, where two reserve slots leave it 92%). A
        backend under a flood that never queues in vLLM is never confirmed, so its probe slot
        stayed counted for good."""
        caps = [self._sure_cap(b) for b in self._members(model)]
        if None in caps:
            return None
        return max(sum(c for c in caps if c is not None) - self.rules.reserve, 0.0)

    def heavy(self, key_id: UUID) -> bool:
        """Above its fair share of recent service: the reserve is not for this tenant."""
        return self.service(key_id) > self._share * 1.05

    def _members(self, model: str) -> list[Backend]:
        return [
            b for b in self._backends.candidates(model) if b.kind == "vllm" and b.state == "active"
        ]

    def _room(self, backend: Backend, heavy: bool = True) -> float:
        """Free slots as this node sees them; without the probe slot for a light request."""
        cap = self._cap(backend) if heavy else self._sure_cap(backend)
        if cap is None:
            return math.inf
        return cap - self._view.load(backend) - self._reserved.get(backend.id, 0)

    def _sure_cap(self, backend: Backend) -> float | None:
        """The capacity without an estimated backend's probe slot (room for heavy requests
        only): what the reserve and light requests count on."""
        cap = self._cap(backend)
        return cap - 1.0 if cap is not None and backend.id in self._probing else cap

    def _turn(self, model: str, members: list[Backend]) -> list[Backend]:
        """The members in this node's order: the nodes (by id, among those that published a
        demand for the model) start at different members. Two nodes that each see one free
        slot on each backend then send their light requests to different ones; in the same
        order they both took the first, and one of them waited a whole completion in its vLLM
        queue (a 2.9x p99 in the noisy demo with two reserve slots)."""
        if len(members) < 2:
            return members
        nodes = sorted(self._fleet_demand.get(model, {}).keys() | {self._node_id})
        ordered = sorted(members, key=lambda b: b.id)
        start = nodes.index(self._node_id) % len(ordered)
        return ordered[start:] + ordered[:start]

    def _free(self, model: str, heavy: bool = False) -> Backend | None:
        """The candidate with the most room (ties to the first in this node's order), or
        None when none has room for this request (a heavy tenant's request needs this node
        under its quota, on the model and on the backend, and the model's reserve left over
        after it)."""
        best: Backend | None = None
        best_room = total = 0.0
        quota = self.quota(model) if heavy else math.inf
        parts = self._parts(model, quota) if heavy else {}
        shares = self._reserve_shares(model) if heavy else {}
        members = self._members(model)
        for backend in members if heavy else self._turn(model, members):
            sure = self._room(backend, False)  # the reserve is kept out of the probe slot
            room = self._room(backend) if heavy else sure
            total += max(sure, 0.0)
            if room < 1.0 or (best is not None and room <= best_room):
                continue
            if heavy and not (
                self._under_quota(backend, quota, parts) and _keeps_share(backend, shares, sure)
            ):
                continue
            best, best_room = backend, room
        if not heavy:
            return best
        kept = self.rules.reserve + self._others_part(model, members)
        return None if total - 1.0 < kept or self._held(model) + 1 > quota else best

    def _reserve_shares(self, model: str) -> dict[str, float]:
        """Each backend's share of the model's reserve: whole slots, in proportion to its
        capacity, that add up to the reserve; the odd slots to the backends first by id, so
        every node counts the same. Rounded down per backend, a model with more backends than
        reserved slots kept no reserve anywhere (3 backends, 2 slots: 0 each)."""
        members = sorted(self._members(model), key=lambda b: b.id)
        return self._by_capacity(members, self.rules.reserve, self.rules.reserve)

    def _by_capacity(self, members: list[Backend], amount: float, slots: int) -> dict[str, float]:
        """`amount` over `members` in proportion to their capacity (without probe slots), in
        whole slots that add up to `slots`, ties in the members' order (none: no capacity)."""
        caps = [self._sure_cap(b) or 0.0 for b in members]
        total = sum(caps)
        if total <= 0:
            return {}
        whole = _whole_slots([amount * cap / total for cap in caps], slots)
        return {b.id: share for b, share in zip(members, whole, strict=True)}

    def _others_part(self, model: str, members: list[Backend]) -> float:
        """The other nodes' part of the room above the reserve that the last poll showed:
        their heavy requests since then are not in this view. Each node takes only its own
        part (split as the quotas are, in whole slots), so together they never eat into the
        reserve between polls. With the whole room open to every node, two nodes that each
        saw one slot above the reserve both took it, and a small tenant's request sent to
        what this view still showed as free waited a completion in the vLLM queue (0.2 s
        in the noisy demo with two reserve slots, 6x its solo time to first token).

        The others' part is no more than their quotas leave them: what the poll showed
        them holding (all it read less this node's own at the poll) counts against it.
        Kept for another node already at its quota, the slot idled while this node's
        queue waited for it (a 2-node fleet of 2 x 2 slots ran 2 of its 3 unreserved
        slots for good)."""
        polled = load = mine = 0.0
        for backend in members:
            cap = self._sure_cap(backend)  # as `_free` counts the room
            if cap is None or backend.running is None:
                return 0.0  # room unknown: the quota alone bounds this node
            used = backend.running + (backend.waiting or 0.0)
            polled += max(cap - used, 0.0)
            load += used
            mine += backend.inflight_at_poll
        above = max(polled - self.rules.reserve, 0.0)
        theirs = above - self._part(model, above)
        room = self._quota_room(model)
        if room is None:
            return theirs
        their_quota = room - self._part(model, room)
        their_load = max(load - mine, 0.0)
        return min(theirs, max(their_quota - their_load, 0.0))

    def _under_quota(self, backend: Backend, quota: float, parts: dict[str, float]) -> bool:
        """This node's heavy requests fit on `backend`: its part of the node's quota
        (`parts`, from `_parts`). The model's quota alone let two nodes fill the same backend
        from one stale poll while its peer idled."""
        if self._cap(backend) is None or math.isinf(quota):
            return True
        part = parts.get(backend.id, 0.0)
        return backend.inflight + self._reserved.get(backend.id, 0) + 1 <= part

    def _parts(self, model: str, quota: float) -> dict[str, float]:
        """This node's quota over the model's backends, in proportion to their capacity, in
        whole slots that add up to it: the odd slots to the largest remainders, ties in this
        node's order (`_turn`), so the nodes' odd slots land on different backends and each
        backend keeps its share of the reserve. Rounded one by one, every node's half slot
        went to the same backend: two nodes filled it to its last slot while the reserve's
        free slots sat on its peer, and a light request that a view one poll old sent to the
        full one waited 118 ms in its vLLM queue (3.5x its solo time to first token)."""
        if math.isinf(quota):
            return {}  # nothing to spread (no limit on any backend: `_under_quota`)
        members = self._turn(model, self._members(model))
        return self._by_capacity(members, quota, math.floor(quota))

    def has_room(self, backend: Backend, model: str, key_id: UUID | None = None) -> bool:
        """Room on `backend` for one more request of `key_id`'s tenant on `model` (of any
        light tenant, when None)."""
        heavy = key_id is not None and self.heavy(key_id)
        if self._room(backend, heavy) < 1.0:
            return False
        if not heavy:
            return True
        quota = self.quota(model)
        return self._under_quota(backend, quota, self._parts(model, quota)) and _keeps_share(
            backend, self._reserve_shares(model), self._room(backend, False)
        )

    def keeps_target(self, target: Backend, released: Backend, model: str, key_id: UUID) -> bool:
        """Whether a request released on `released` goes to its own `target` (its cache)
        instead. A light tenant's target needs room with a slot to spare for each other node,
        unless it has more room than `released`: the other nodes' requests since the last
        poll are not in this view, and a light request sent to the last slot of a backend
        another node had just filled waited a whole completion in the vLLM queue (0.7 s in the
        noisy demo, 20x its solo time to first token) while `released` had room. On a tie
        `released` wins: it is this node's turn among the backends with the most room
        (`_turn`), where another node's light request is least likely to go. A heavy
        tenant's requests are placed by this node's exact count against its quota on each
        backend; sending them elsewhere too cost the flood a third of its cache hits."""
        if self.heavy(key_id):
            return self.has_room(target, model, key_id)
        room = self._room(target, False)
        spare = float(max(self._nodes() - 1, 0))
        return room >= 1.0 and (room >= 1.0 + spare or room > self._room(released, False))

    def _update_busy(self) -> None:
        self.busy = set(self._guarded) | {m for m, q in self._queues.items() if q.entries}

    # -- the queue -----------------------------------------------------------------------------

    async def wait(self, key_id: UUID, model: str, priority: int, estimate: int) -> Backend | None:
        """Wait for room, fairly. Returns the backend with room that admitted the request
        (None: the model is not guarded, it goes where routing sends it); raises QueueRefused."""
        q = self._queues.setdefault(model, _ModelQueue())
        if model not in self._guarded and not q.entries:
            return None
        free = self._free(model, self.heavy(key_id))
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
        if not q.entries and model not in self._guarded:
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
        heavy = (len(counts) > 1 and mine > depth / len(counts)) or (
            self._tenants > 1 and self.heavy(entry.key_id)
        )
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
            head = q.entries[0]
            if head.future.done():
                heapq.heappop(q.entries)
                continue
            free = self._free(model, self.heavy(head.key_id))
            if free is not None:
                entry = heapq.heappop(q.entries)
            else:
                # A heavy head over its quota: the best light request behind it may still go
                # (one queued while the flood's tag was low would otherwise block them all).
                found = self._best_light(q)
                free = None if found is None else self._free(model)
                if found is None or free is None:
                    break
                entry = found
                q.entries.remove(entry)
                heapq.heapify(q.entries)
            self._left(model, q, entry)
            q.released += 1
            if self._on_wait is not None:
                self._on_wait(model, self._clock() - entry.arrived)
            entry.future.set_result(self._reserve(free))

    def _best_light(self, q: _ModelQueue) -> _Entry | None:
        heavy: dict[UUID, bool] = {}
        best: _Entry | None = None
        for e in q.entries:
            if e.future.done() or (best is not None and e.sort >= best.sort):
                continue
            if e.key_id not in heavy:
                heavy[e.key_id] = self.heavy(e.key_id)
            if not heavy[e.key_id]:
                best = e
        return best

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


def _split(room: int, demands: dict[str, float]) -> dict[str, float]:
    """Each node's part of `room` slots in a max-min fair split over the demands, in whole
    slots that add up to the room (fractional parts idled a slot: two nodes holding 1.5 each
    hold 1). A node asking less than an equal part gets what it asks, the rest is split among
    the others; one with no demand yet keeps one slot, so its first request need not wait a
    round. The odd slots go to the largest remainders, ties to the first node ids."""
    asks = {node: max(d, 1.0) for node, d in demands.items()}
    parts: dict[str, float] = {}
    left, n = float(room), len(asks)
    for node, d in sorted(asks.items(), key=lambda a: a[1]):
        parts[node] = min(d, left / n)
        left -= parts[node]
        n -= 1
    nodes = sorted(parts)
    shares = [parts[node] for node in nodes]
    slots = round(min(float(room), sum(shares)))
    return dict(zip(nodes, _whole_slots(shares, slots), strict=True))


def _keeps_share(backend: Backend, shares: dict[str, float], sure_room: float) -> bool:
    """A heavy request on `backend` leaves the backend its share of the reserve
    (`_reserve_shares`), as this node sees it. The nodes' parts of the backend alone did not:
    one node held more than its part there (light requests count), another took the last
    slot below its own part, through the probe slot its view showed, and a light request sent
    by a third view to what it saw as the reserve waited a completion in the vLLM queue
    (110 ms, 2.9x its solo TTFT) while the peer backend had 3 free."""
    share = shares.get(backend.id, 0.0)
    return share == 0 or sure_room - 1.0 >= share  # with no share, the probe slot may go


def _whole_slots(shares: list[float], slots: int) -> list[float]:
    """`shares` rounded to whole slots that add up to `slots`: each its floor, the odd slots
    to the largest remainders, ties to the first in the list."""
    whole = [float(math.floor(x)) for x in shares]
    odd = slots - int(sum(whole))
    by_remainder = sorted(range(len(shares)), key=lambda i: whole[i] - shares[i])
    for i in by_remainder[: max(odd, 0)]:
        whole[i] += 1.0
    return whole
