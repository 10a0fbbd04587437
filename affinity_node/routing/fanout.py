"""When a pair's backend set grows and shrinks (load-aware fan-out).

Grow: for `grow_after_s` some member of the set has been hot (routing/load_view.py) and none cool,
and the set is below `max_fanout`: the least-loaded eligible backend joins. Not "every member
hot": conversations stay on their member, so one member can queue while the others are busy
but not saturated, and waiting for all of them left it queueing (skew demo: 2 runs in 5 with
a queue of 27 on one member and TTFT p90 1.7 s instead of 0.3-0.5 s). Growing moves ~1/k of
each member's conversations, the hot one's too. Shrink: every member has been cool
for `shrink_after_s` (minutes, not seconds: hysteresis), and the newest member leaves; or
the pair's own request rate has stayed below what its set minus one member carried
(`QUIET_SHARE` x (k-1)/k of the rate it had at size k) for as long, and the newest member
leaves though the members are busy with other pairs (a busy fleet is never all cool, so sets
grown for a burst stayed forever); a member that is no longer a healthy candidate leaves at
once. The rate is this node's count of the pair's requests (an exponential moving average over
`RATE_WINDOW_S`): a load balancer spreads each tenant alike over the nodes, so its ratio to
the rate at size k is the fleet's on every node. Each change is a compare-and-set on the
binding's version under the pair's lock (the engine's `set_members`), so when every node
reaches the same decision at once, which they do since they read the same load signal, the set
changes by exactly one member.

Growth is noticed on the request path (a hot pair has requests) with one set lookup per
request; shrinking is checked after each load poll over the few pairs that have a set.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from affinity_node.routing.backends import BackendPool
from affinity_node.routing.engine import AffinityEngine, Resolution
from affinity_node.routing.load_view import LoadView
from affinity_node.routing.ports import Clock, Members, Pair
from affinity_node.tasks import Pending
from affinity_node.vocabulary import FanoutDirection, FanoutReason

MAX_TRACKED = 100_000
"""Pairs whose hot or cool streak is remembered; beyond, the oldest are forgotten."""
RATE_WINDOW_S = 10.0
"""Time constant of a set pair's request rate (exponential moving average)."""
QUIET_SHARE = 0.75
"""A set of k shrinks once the pair's rate stays under this x (k-1)/k of its rate at size k."""


@dataclass(slots=True)
class PairRate:
    """A set pair's request rate on this node, and its highest since the set reached `size`."""

    size: int
    since: float
    at: float
    rate: float = 0.0
    peak: float = 0.0

    def now(self, now: float) -> float:
        return self.rate * math.exp(-(now - self.at) / RATE_WINDOW_S)

    def count(self, now: float) -> None:
        self.rate = self.now(now) + 1.0 / RATE_WINDOW_S
        self.at = now
        if now - self.since >= RATE_WINDOW_S:  # the average has seen a whole window
            self.peak = max(self.peak, self.rate)

    def quiet(self, now: float) -> bool:
        """Whether the pair's rate fits in one member fewer."""
        share = QUIET_SHARE * (self.size - 1) / self.size
        return self.peak > 0 and self.now(now) < share * self.peak


@dataclass(frozen=True, slots=True)
class FanoutRules:
    max_fanout: int = 4
    grow_after_s: float = 2.0
    shrink_after_s: float = 120.0


class FanoutController:
    def __init__(
        self,
        engine: AffinityEngine,
        load: LoadView,
        backends: BackendPool,
        rules: FanoutRules,
        clock: Clock = time.monotonic,
    ) -> None:
        self._engine = engine
        self._load = load
        self._backends = backends
        self.rules = rules
        self._clock = clock
        self._hot_since: dict[Pair, float] = {}
        self._cool_since: dict[Pair, float] = {}
        self._rates: dict[Pair, PairRate] = {}
        self._changing: set[Pair] = set()
        self._changes = Pending()

    @property
    def enabled(self) -> bool:
        return self.rules.max_fanout > 1

    def observe(self, pair: Pair, res: Resolution) -> None:
        """A request for `pair` was answered from its binding: grow the set when it is due."""
        model = pair[1]
        hot = self._load.hot(model)
        fanout = res.fanout
        if fanout:
            self._count(pair, len(fanout) + 1)
        if (
            not hot  # the usual case, kept to one check per request
            or len(fanout) + 1 >= self.rules.max_fanout
            or (res.backend not in hot and not any(m in hot for m in fanout))
            or self._any_cool(model, res)
        ):
            if pair in self._hot_since:
                del self._hot_since[pair]
            return
        now = self._clock()
        since = self._hot_since.get(pair)
        if since is None:
            self._remember(self._hot_since, pair, now)
            return
        if now - since < self.rules.grow_after_s or pair in self._changing:
            return
        new = self._load.least_loaded(model, exclude={res.backend, *fanout})
        if new is None or new.id in hot:
            return  # nowhere cooler to grow to
        self._hot_since.pop(pair, None)
        self._change(pair, res.version, (*fanout, new.id), "grow", "hot")

    def _count(self, pair: Pair, size: int) -> None:
        now = self._clock()
        rate = self._rates.get(pair)
        if rate is None or rate.size != size:
            fresh = PairRate(size, now, now, rate.now(now) if rate is not None else 0.0)
            self._rates[pair] = fresh
            if len(self._rates) > MAX_TRACKED:
                del self._rates[next(iter(self._rates))]
            rate = fresh
        rate.count(now)

    def _any_cool(self, model: str, res: Resolution) -> bool:
        cool = self._load.cool(model)
        return res.backend in cool or any(m in cool for m in res.fanout)

    def sweep(self) -> None:
        """After a load poll: shrink the sets that have been cool long enough, and drop
        members that are no longer healthy candidates."""
        now = self._clock()
        for pair, entry in self._engine.cache.sets():
            if pair in self._changing or entry.deadline <= now:
                continue
            model = pair[1]
            healthy = self._backends.candidate_ids(model)
            gone = [m for m in entry.fanout if m not in healthy]
            if gone:
                kept = tuple(m for m in entry.fanout if m in healthy)
                self._change(pair, entry.version, kept, "shrink", "unhealthy")
                continue
            cool = self._load.cool(model)
            rate = self._rates.get(pair)
            quiet = rate is not None and rate.size == len(entry.fanout) + 1 and rate.quiet(now)
            if quiet or (entry.backend in cool and all(m in cool for m in entry.fanout)):
                since = self._cool_since.get(pair)
                if since is None:
                    self._remember(self._cool_since, pair, now)
                elif now - since >= self.rules.shrink_after_s:
                    del self._cool_since[pair]
                    reason: FanoutReason = "quiet" if quiet else "cool"
                    self._change(pair, entry.version, entry.fanout[:-1], "shrink", reason)
            else:
                self._cool_since.pop(pair, None)

    @staticmethod
    def _remember(streaks: dict[Pair, float], pair: Pair, now: float) -> None:
        streaks[pair] = now
        if len(streaks) > MAX_TRACKED:
            del streaks[next(iter(streaks))]

    def _change(
        self,
        pair: Pair,
        version: int,
        fanout: Members,
        direction: FanoutDirection,
        reason: FanoutReason,
    ) -> None:
        self._changing.add(pair)
        self._changes.start(
            self._run_change(pair, version, fanout, direction, reason), "fanout-change"
        )

    async def _run_change(
        self,
        pair: Pair,
        version: int,
        fanout: Members,
        direction: FanoutDirection,
        reason: FanoutReason,
    ) -> None:
        try:
            await self._engine.set_members(pair, version, fanout, direction, reason)
        finally:
            self._changing.discard(pair)

    async def stop(self) -> None:
        """Lets the set changes under way finish."""
        await self._changes.finish()
