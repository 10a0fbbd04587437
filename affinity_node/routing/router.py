"""Per request: which backend, and what affinity said about it.

Combines the backend pool (health, load), the fallback strategy, the affinity engine and the
fan-out controller. The engine only ever sees vllm and llamacpp backends as candidates:
external ones are never bound. A pair bound to a set of backends is served by the member its
conversation hashes to (routing/members.py); a request goes past its set (a spill) only when
the set cannot grow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from uuid import UUID

from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.routing.backends import Backend, BackendPool
from affinity_node.routing.engine import AffinityEngine, NoCandidates, Resolution
from affinity_node.routing.fanout import FanoutController
from affinity_node.routing.health_state import BackendHealth
from affinity_node.routing.load_view import LoadView
from affinity_node.routing.members import Placements, place, rendezvous
from affinity_node.routing.owners import OwnerIndex
from affinity_node.routing.ports import Pair
from affinity_node.routing.strategies import Strategy
from affinity_node.vocabulary import HEADER_OF, AffinityHeader

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Route:
    """One request's routing, kept up to date through a retry (`Router.after_failure`)."""

    backend: Backend
    """Where the request goes now."""
    affinity: AffinityHeader
    model: str
    """Canonical."""
    bound: Backend | None = None
    """The set member that should serve the pair's request when affinity decided (None for
    bypass and degraded)."""
    first: bool = True
    """Whether `bound` is the set's first member (the one a failover may move)."""
    moves: bool = False
    """Decided when the bound backend failed and the request was retried elsewhere: whether
    the binding follows the retry (said so in the header, done after the success)."""
    pair: Pair | None = None
    """The (API key id, model) the route was decided for (None when affinity did not apply)."""
    members: tuple[str, ...] = ()
    """The pair's backend set when it has more than one member."""
    conversation: Callable[[], bytes] | None = None
    failed: tuple[Backend, ...] = ()
    """Backends this request failed on, in order."""
    pinned: bool = False
    """Only this backend can serve the request (it holds a stored response the request
    names): never retried elsewhere."""
    deadline: float = 0.0
    """The binding's cached deadline when the route was a hit (0: not read)."""


class NoBackend(LookupError):
    """No healthy backend serves the model."""


class OwnerGone(LookupError):
    """The backend that stores a response has left the fleet, or cannot serve now."""


@dataclass(frozen=True, slots=True)
class AffinityRules:
    enabled: bool = True
    load_factor: float = 1.25
    spill_min_gap: int = 8


class Router:
    def __init__(
        self,
        backends: BackendPool,
        strategy: Strategy,
        engine: AffinityEngine | None,
        rules: AffinityRules,
        metrics: AffinityMetrics,
        health: BackendHealth,
        fanout: FanoutController | None = None,
    ) -> None:
        self._backends = backends
        self._health = health
        self._strategy = strategy
        self._engine = engine if rules.enabled else None
        self._rules = rules
        self._m = metrics
        self._fanout = fanout if fanout is not None and fanout.enabled else None
        self._max_fanout = 1 if fanout is None or self._fanout is None else fanout.rules.max_fanout
        self._vllm: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._owners = OwnerIndex()
        self._placements = Placements()

    def _choose_id(self, ids: Sequence[str]) -> str:
        """A backend for a new (or moved) binding: among those holding the fewest bindings,
        the fallback strategy decides.

        Bindings outlive any one request, so balancing their count balances the fleet's
        prefix caches and long-run load; in-flight counts alone tie at low load and scatter
        bindings unevenly (the demo saw 59 vs 276 requests on two backends).
        """
        known = [b for b in map(self._backends.get, ids) if b is not None]
        # New bindings only on active backends (a draining one is giving its own away).
        backends = [b for b in known if b.state == "active"] or known
        engine = self._engine
        if engine is not None and len(backends) > 1:
            cache = engine.cache
            fewest = min(cache.bindings_of(b.id) for b in backends)
            backends = [b for b in backends if cache.bindings_of(b.id) == fewest]
        return self._strategy.choose(backends).id

    def _affinity_candidates(self, model: str) -> tuple[str, ...]:
        """The model's healthy cache-kind backends, recomputed only when the pool's list changes."""
        ids = self._backends.candidate_ids(model)
        cached = self._vllm.get(model)
        if cached is not None and cached[0] is ids:
            return cached[1]
        vllm: list[str] = []
        for i in ids:
            b = self._backends.get(i)
            if b is not None and self._backends.affinity_applies(model, b):
                vllm.append(i)
        result = tuple(vllm)
        self._vllm[model] = (ids, result)
        return result

    def fallback(self, model: str, exclude: Sequence[Backend] = ()) -> Backend | None:
        candidates = [b for b in self._backends.candidates(model) if b not in exclude]
        return self._strategy.choose(candidates) if candidates else None

    def _successor(self, pair: Pair, ids: Sequence[str]) -> str:
        """Where a pair goes when its backend can no longer serve it: the same answer on every
        node for the same candidates (rendezvous hashing of the pair), so the retry of a
        request whose bound backend failed and the rebind that follows land on one backend,
        and the fleet warms one cache. New bindings only on active backends."""
        known = [b for b in map(self._backends.get, ids) if b is not None]
        active = [b.id for b in known if b.state == "active"] or [b.id for b in known]
        return rendezvous(pair[0].bytes + pair[1].encode(), active or ids)

    def after_failure(self, route: Route, reason: str) -> Backend | None:
        """`route.backend` failed before any byte reached the client: reports it to the health
        state machine and answers where to retry, or None (one retry per request). The route
        is updated: its backend, and its header (whether the binding follows the retry)."""
        failed = route.backend
        self._health.request_failed(failed, reason)
        route.failed += (failed,)
        if len(route.failed) > 1 or route.pinned:
            return None
        target = self._retry_target(route)
        if target is None:
            return None
        route.affinity = self._retry_header(route, failed)
        route.backend = target
        return target

    def broke(self, route: Route, reason: str) -> None:
        """The backend broke an answer after bytes reached the client: no retry is possible,
        but the health state machine hears of it."""
        self._health.request_failed(route.backend, reason)

    def _retry_target(self, route: Route) -> Backend | None:
        """Where a request goes after `route.failed`: for a pair whose bound backend failed,
        where the pair goes without it (the conversation's next member of its set, else the
        pair's successor), so this retry and the rebind that follows agree."""
        failed = route.failed
        pair = route.pair
        if route.bound is not None and pair is not None and route.bound in failed:
            ids = self._affinity_candidates(pair[1])
            tried = {b.id for b in failed}
            eligible = [i for i in ids if i not in tried]
            members = [m for m in route.members if m in eligible]
            if members:
                key = route.conversation() if route.conversation is not None else b""
                return self._backends.get(rendezvous(key, members) if key else members[0])
            if eligible:
                return self._backends.get(self._successor(pair, eligible))
        return self.fallback(route.model, exclude=failed)

    def _retry_header(self, route: Route, failed: Backend) -> AffinityHeader:
        """The header of a request retried elsewhere after `failed` failed: its binding moves
        only when the bound backend is unhealthy by now (one error is not enough, as the
        health thresholds say); otherwise the retry is a spill and the binding stays."""
        if route.bound is None or failed is not route.bound or route.affinity == "spill":
            return route.affinity
        route.moves = not failed.healthy and route.first
        return "rebind" if route.moves else "spill"

    def succeeded(self, route: Route) -> None:
        """After a success: extend the binding when its backend served, or move it to the
        backend that served when the bound one failed and was unhealthy by the retry (as the
        header said). A spill never touches it; nothing is ever bound to a backend affinity
        does not apply to."""
        served_by = route.backend
        self._health.request_succeeded(served_by)
        engine, bound, pair = self._engine, route.bound, route.pair
        if engine is None or bound is None or pair is None:
            return
        api_key_id, model = pair
        if bound in route.failed:
            if route.moves and self._backends.affinity_applies(model, served_by):
                engine.failed_over(api_key_id, model, bound.id, served_by.id)
            else:
                self._m.spills.labels(model, "failover").inc()
        elif served_by is bound and route.affinity != "spill":
            engine.served(api_key_id, model, served_by.id, route.deadline)

    def _member(
        self,
        res: Resolution,
        ids: Sequence[str],
        conversation: Callable[[], bytes] | None,
        opens: Callable[[], bool] | None,
    ) -> str:
        """The set member for this request, among the healthy members: a new conversation's
        is the least loaded when its own has a queue (routing/members.py `place`); a later
        turn's is where its
        conversation was placed, when this node diverted it, else its rendezvous member."""
        if not res.fanout:
            return res.backend
        members = [m for m in (res.backend, *res.fanout) if m in ids]
        if len(members) == 1 or conversation is None:
            return members[0]
        key = conversation()
        usual = rendezvous(key, members)
        placed = self._placements.get(key) if len(self._placements) else None
        # Whether the request opens its conversation is asked only when it could matter: its
        # member has a queue, or this node placed a conversation with this key elsewhere.
        if placed is None and not self._queued(usual):
            return usual
        if opens is not None and opens():
            chosen = place(key, members, self._load_of, self._queued)
            self._placements.put(key, None if chosen == usual else chosen)
            return chosen
        return placed if placed is not None and placed in members else usual

    def _queued(self, backend_id: str) -> bool:
        backend = self._backends.get(backend_id)
        return backend is None or bool(backend.waiting)

    def _load_of(self, backend_id: str) -> float:
        backend = self._backends.get(backend_id)
        return LoadView.load(backend) if backend is not None else float("inf")

    def to_owner(self, owner: bytes, model: str, api_key_id: UUID | None = None) -> Route:
        """A request naming a stored response goes to the backend that stores it, whatever the
        pair's binding or set says, and nowhere else: no other backend has it. A draining
        backend keeps taking them (until it is removed); a removed, disabled or unhealthy one
        cannot, and OwnerGone says so.

        With `api_key_id`, the pair's set still sees the request: a hot tenant whose turns
        all follow stored responses must grow its set too, or its new conversations (the only
        ones that can move) would keep landing on the hot members."""
        found = self._owners.find(owner, tuple(b.id for b in self._backends.backends))
        backend = self._backends.get(found) if found is not None else None
        if backend is None or not backend.healthy or backend.state == "disabled":
            raise OwnerGone(model)
        if api_key_id is not None and self._fanout is not None and self._engine is not None:
            pair = (api_key_id, model)
            res = self._engine.peek(pair)
            if res is not None:
                self._fanout.observe(pair, res)
        return Route(backend, "hit", model, pinned=True)

    async def route(
        self,
        api_key_id: UUID,
        model: str,
        affinity_path: bool,
        conversation: Callable[[], bytes] | None = None,
        opens: Callable[[], bool] | None = None,
    ) -> Route:
        """`model` is canonical; `affinity_path` is False for routes affinity never applies to;
        `conversation` gives the request's conversation key and `opens` whether the request
        opens its conversation (both asked only for a set)."""
        engine = self._engine
        if engine is not None and affinity_path:
            ids = self._affinity_candidates(model)
            if ids:
                pair = (api_key_id, model)
                try:
                    res = await engine.resolve(
                        api_key_id, model, ids, self._choose_id, self._successor
                    )
                except NoCandidates:
                    res = None
                if res is not None:
                    member = self._member(res, ids, conversation, opens)
                    backend = self._backends.get(member)
                    if backend is not None:
                        if res.outcome == "degraded":
                            return Route(backend, "degraded", model)
                        first = member == res.backend
                        members = (res.backend, *res.fanout) if res.fanout else ()
                        if res.outcome == "hit":
                            if self._fanout is not None:
                                self._fanout.observe(pair, res)
                            # Past the set only when it cannot grow any more.
                            if len(
                                res.fanout
                            ) + 1 >= self._max_fanout and self._backends.overloaded(
                                backend, model, self._rules.load_factor, self._rules.spill_min_gap
                            ):
                                other = self.fallback(
                                    model,
                                    exclude=[
                                        b
                                        for b in map(self._backends.get, members or (res.backend,))
                                        if b
                                    ],
                                )
                                if other is not None:
                                    self._m.spills.labels(model, "load").inc()
                                    return Route(other, "spill", model, backend, first, pair=pair)
                        return Route(
                            backend,
                            HEADER_OF[res.outcome],
                            model,
                            backend,
                            first,
                            pair=pair,
                            members=members,
                            conversation=conversation,
                            deadline=res.deadline,
                        )
        chosen = self.fallback(model)
        if chosen is None:
            raise NoBackend(model)
        return Route(chosen, "bypass", model)
