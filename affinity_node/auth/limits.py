"""Fleet-wide per-key limits (requests and tokens a minute, requests at once), enforced from
memory on the request path.

Each node enforces a share of every limit: the share follows where the key's traffic lands.
About once a second each node writes, in one statement, how much it was offered on each
limited scope (a key, or a key on one model) and reads the other nodes' figures for the same
scopes; its share is `my_demand / total_demand` (offered, refused requests included, so a node
refused for a small share still earns a larger one). A scope no other node reports gets the
whole limit divided by the nodes alive (their heartbeats); a node that was offered nothing
lately keeps a small floor, so it admits a little at once when traffic moves to it.

Requests and tokens are token buckets per node: `limit * share / 60` a second, holding at most
one second of it (rate limits are quantised to the second, as OpenAI's are: a key limited to
600 a minute is not given 600 at once). A request is admitted while its request bucket holds
one and its token bucket is above zero; it is charged in full, so a large token estimate
drives the token bucket below zero (debt) rather than never passing. Tokens are charged from
an estimate up front (prompt bytes / 4 + the answer's bound) and corrected from the answer's
usage. Concurrency: at most `max_concurrent * share` (at least
one) in flight on this node.

A database outage keeps the last shares: the limits stay enforced locally, nothing fails for
it. A key without limits costs one dict lookup per request.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from uuid import UUID

from affinity_node.auth.ports import DemandRow, LimitRow, LimitStore
from affinity_node.vocabulary import LimitKind

log = logging.getLogger(__name__)

EXCHANGE_EVERY_S = 1.0
"""How often each node publishes its demand and takes its shares."""

HEARTBEAT = UUID(int=0)
"""The scope every node writes each round (model ''): how many nodes are alive."""

BURST_S = 1.0
"""A bucket holds this many seconds of its rate (at least two requests)."""

FLOOR = 0.05
"""A node's smallest share of a scope, divided by the nodes alive."""

SMOOTHING = 0.5
"""Weight of the latest round in a scope's demand (the rest is its history)."""

IDLE_S = 60.0
"""A scope offered nothing for this long stops being published."""

FRESH_S = 5.0
"""Another node's row counts while it was written within this many seconds."""

RESYNC_S = 30.0
"""Every limit row is re-read about this often (a lost notification lasts no longer)."""

EXPIRE_EVERY = 60
"""Rounds between deletions of abandoned rows."""


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    priority: int | None = None
    """The key's fair-queueing class (routing/fairq.py; on its model '' row), not a limit."""


class _Bucket:
    """`rate` a second, at most `cap` saved. A request bucket admits while it holds a whole
    request; a token bucket while it is above zero (a large estimate then takes it into debt,
    rather than never passing). It saves at least one admission more than it needs: a bucket
    that could only just hold one would drop the refill of any gap between arrivals (a node
    offered 4 a second for a share of 0.67 would admit 0.5)."""

    __slots__ = ("at", "cap", "level", "need", "rate")

    def __init__(self, rate: float, now: float, need: float) -> None:
        self.rate = rate
        self.need = need
        self.cap = max(need + 1.0, rate * BURST_S)
        self.level = self.cap
        self.at = now

    def refill(self, now: float) -> None:
        self.level = min(self.cap, self.level + (now - self.at) * self.rate)
        self.at = now

    def set_rate(self, rate: float, now: float) -> None:
        self.refill(now)
        self.rate = rate
        self.cap = max(self.need + 1.0, rate * BURST_S)
        self.level = min(self.level, self.cap)

    def short(self) -> bool:
        return self.level < self.need

    def wait_s(self) -> float:
        """Seconds until it admits again."""
        if not self.short():
            return 0.0
        return 60.0 if self.rate <= 0 else (self.need - self.level) / self.rate

    def reset_s(self) -> float:
        """Seconds until it is full again."""
        return 0.0 if self.rate <= 0 else max(0.0, (self.cap - self.level) / self.rate)


class Scope:
    """One limited (key, model) on this node (model '' = the key on every model)."""

    __slots__ = (
        "demand_requests",
        "demand_tokens",
        "inflight",
        "last_offered",
        "limits",
        "max_inflight",
        "model",
        "offered_requests",
        "offered_tokens",
        "requests",
        "share_requests",
        "share_tokens",
        "tokens",
    )

    def __init__(self, model: str, limits: Limits, share: float, now: float) -> None:
        self.model = model
        self.limits = limits
        self.share_requests = share
        self.share_tokens = share
        self.requests: _Bucket | None = None
        self.tokens: _Bucket | None = None
        self.inflight = 0
        self.max_inflight = 0
        self.offered_requests = 0.0
        self.offered_tokens = 0.0
        self.demand_requests = 0.0
        self.demand_tokens = 0.0
        self.last_offered = -math.inf
        self.apply(now)

    def apply(self, now: float) -> None:
        """Rates and caps from the limits and the current shares."""
        lim = self.limits
        self.requests = _rated(self.requests, lim.rpm, self.share_requests, now, 1.0 - 1e-9)
        self.tokens = _rated(self.tokens, lim.tpm, self.share_tokens, now, 1e-9)
        if lim.max_concurrent is not None:
            self.max_inflight = max(1, round(lim.max_concurrent * self.share_requests))

    def refusal(self, now: float) -> tuple[LimitKind, float] | None:
        """Which limit refuses a request now, and seconds until it would not."""
        if self.requests is not None:
            self.requests.refill(now)
            if self.requests.short():
                return "rpm", self.requests.wait_s()
        if self.tokens is not None:
            self.tokens.refill(now)
            if self.tokens.short():
                return "tpm", self.tokens.wait_s()
        if self.limits.max_concurrent is not None and self.inflight >= self.max_inflight:
            return "concurrent", 1.0
        return None

    def remaining(self, bucket: _Bucket, limit: int, share: float) -> int:
        """The fleet-wide figure this node's bucket stands for."""
        return max(0, min(limit, int(bucket.level / max(share, 1e-9))))


def _rated(
    bucket: _Bucket | None, limit: int | None, share: float, now: float, need: float
) -> _Bucket | None:
    if limit is None:
        return None
    rate = limit * share / 60.0
    if bucket is None:
        return _Bucket(rate, now, need)
    bucket.set_rate(rate, now)
    return bucket


class Refused(Exception):
    """A limit refused the request: a 429 with these headers."""

    def __init__(
        self, kind: LimitKind, limit: int, retry_after_s: float, headers: dict[str, str]
    ) -> None:
        super().__init__(kind)
        self.kind = kind
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.headers = headers


class Ticket:
    """An admitted request's charge, settled when its answer is done (`Limiter.finish`)."""

    __slots__ = ("estimate", "headers", "scopes")

    def __init__(self, scopes: list[Scope], estimate: int, headers: dict[str, str]) -> None:
        self.scopes = scopes
        self.estimate = estimate
        self.headers = headers


KeyScopes = dict[str, Scope]
"""A limited key's scopes by model ('' = every model)."""


class Limiter:
    def __init__(
        self,
        store: LimitStore,
        node_id: str,
        on_refused: Callable[[str, LimitKind], None] | None = None,
    ) -> None:
        """`on_refused(model, kind)` counts a refusal (the ratelimited metric)."""
        self._store = store
        self._node_id = node_id
        self._keys: dict[UUID, KeyScopes] = {}
        self._priority: dict[UUID, int] = {}
        self._pending: set[UUID] = set()
        self._reload_all = True
        self._next_resync = 0.0
        self._alive = 1
        self._round_at = time.monotonic()
        self._rounds = 0
        self._on_refused = on_refused
        self.exchanged = 0
        """Rounds whose exchange with the other nodes succeeded."""

    @property
    def alive(self) -> int:
        """Nodes alive as of the last exchange (this one included)."""
        return self._alive

    # -- the request path ----------------------------------------------------------------------

    def of(self, key_id: UUID) -> KeyScopes | None:
        """The key's scopes, None when it has no limits (the one lookup every request pays)."""
        return self._keys.get(key_id)

    def priority(self, key_id: UUID) -> int:
        """The key's fair-queueing class (0 unless set); asked only while a model saturates."""
        return self._priority.get(key_id, 0)

    def admit(self, scopes: KeyScopes, model: str, estimate: int) -> Ticket:
        """Charge one request of `estimate` tokens on the key's scopes for `model`, or raise
        Refused (nothing charged); every scope counts the offer either way (its demand)."""
        now = time.monotonic()
        mine = [s for s in (scopes.get(""), scopes.get(model) if model else None) if s is not None]
        refused: tuple[Scope, LimitKind, float] | None = None
        for scope in mine:
            scope.offered_requests += 1
            scope.offered_tokens += estimate
            scope.last_offered = now
            found = scope.refusal(now)
            if found is not None and refused is None:
                refused = (scope, *found)
        if refused is not None:
            scope, kind, wait = refused
            raise self._refuse(scope, kind, wait, model)
        for scope in mine:
            if scope.requests is not None:
                scope.requests.level -= 1
            if scope.tokens is not None:
                scope.tokens.level -= estimate
            scope.inflight += 1
        return Ticket(mine, estimate, _headers(mine, now))

    def finish(self, ticket: Ticket, used_tokens: int | None) -> None:
        """The answer is done: its slot is free; its tokens replace the estimate when known."""
        now = time.monotonic()
        for scope in ticket.scopes:
            scope.inflight -= 1
            if used_tokens is not None and scope.tokens is not None:
                scope.tokens.refill(now)
                scope.tokens.level += ticket.estimate - used_tokens
                scope.tokens.level = min(scope.tokens.level, scope.tokens.cap)

    def _refuse(self, scope: Scope, kind: LimitKind, wait_s: float, model: str) -> Refused:
        if self._on_refused is not None:
            self._on_refused(model, kind)
        lim = scope.limits
        limit = {"rpm": lim.rpm, "tpm": lim.tpm, "concurrent": lim.max_concurrent}[kind] or 0
        headers = _headers([scope], time.monotonic())
        headers["Retry-After"] = str(max(1, math.ceil(wait_s)))
        headers["retry-after-ms"] = str(max(1, math.ceil(wait_s * 1000)))
        return Refused(kind, limit, wait_s, headers)

    # -- limits on keys ------------------------------------------------------------------------

    def key_changed(self, key_id: UUID | None) -> None:
        """A doorbell (a notification on api_key_changes): the next round re-reads the key;
        None (the listener resynced: notifications may have been lost): every key."""
        if key_id is None:
            self._reload_all = True
        else:
            self._pending.add(key_id)

    def load(self, rows: Iterable[LimitRow], only: Iterable[UUID] | None = None) -> None:
        """Replace the limits of `only` (None: of every key) by `rows`; a key's counters live
        on when its limits change."""
        now = time.monotonic()
        wanted: dict[UUID, dict[str, Limits]] = {}
        classes: dict[UUID, int] = {}
        for key_id, model, rpm, tpm, conc, priority in rows:
            if priority and not model:
                classes[key_id] = priority
            if rpm is None and tpm is None and conc is None:
                continue
            wanted.setdefault(key_id, {})[model] = Limits(rpm, tpm, conc)
        self._set_classes(classes, only)
        names = list(self._keys) if only is None else list(only)
        for key_id in set(names) | (set(wanted) if only is None else set()):
            self._set_key(key_id, wanted.get(key_id), now)

    def _set_classes(self, classes: dict[UUID, int], only: Iterable[UUID] | None) -> None:
        if only is None:
            self._priority = classes
            return
        for key_id in only:
            if key_id in classes:
                self._priority[key_id] = classes[key_id]
            else:
                self._priority.pop(key_id, None)

    def _set_key(self, key_id: UUID, limits: dict[str, Limits] | None, now: float) -> None:
        if not limits:
            self._keys.pop(key_id, None)
            return
        old = self._keys.get(key_id, {})
        new: KeyScopes = {}
        for model, lim in limits.items():
            scope = old.get(model)
            if scope is None:
                scope = Scope(model, lim, 1.0 / self._alive, now)
            else:
                scope.limits = lim
                scope.apply(now)
            new[model] = scope
        self._keys[key_id] = new

    # -- the exchange (about once a second, off the request path) --------------------------------

    async def round(self) -> None:
        """Reload what changed, publish this node's demand, take shares from everyone's."""
        await self._reload()
        now = time.monotonic()
        mine = self._measure(now)
        others = await self._store.exchange(self._node_id, mine, FRESH_S)
        self._share(others, time.monotonic())
        self.exchanged += 1
        self._rounds += 1
        if self._rounds % EXPIRE_EVERY == 0:
            await self._store.expire()

    async def _reload(self) -> None:
        now = time.monotonic()
        if self._reload_all or now >= self._next_resync:
            self._pending.clear()
            self._reload_all = True  # stays set if the read fails
            self.load(await self._store.all_limits())
            self._reload_all = False
            self._next_resync = now + RESYNC_S * random.uniform(0.8, 1.2)
        elif self._pending:
            named, self._pending = self._pending, set()
            try:
                rows = await self._store.limits_of(list(named))
            except BaseException:
                self._pending |= named
                raise
            self.load(rows, only=named)

    def _measure(self, now: float) -> list[tuple[UUID, str, float, float]]:
        """Each scope's demand (offered a second, smoothed); the ones offered anything lately."""
        dt = max(now - self._round_at, 1e-3)
        self._round_at = now
        out: list[tuple[UUID, str, float, float]] = [(HEARTBEAT, "", 0.0, 0.0)]
        for key_id, scopes in self._keys.items():
            for model, s in scopes.items():
                s.demand_requests = _smooth(s.demand_requests, s.offered_requests / dt)
                s.demand_tokens = _smooth(s.demand_tokens, s.offered_tokens / dt)
                s.offered_requests = s.offered_tokens = 0.0
                if now - s.last_offered < IDLE_S or s.inflight:
                    out.append((key_id, model, s.demand_requests, s.demand_tokens))
        return out

    def _share(self, others: Sequence[DemandRow], now: float) -> None:
        totals: dict[tuple[UUID, str], list[float]] = {}
        alive = 1
        for key_id, model, _node, requests, tokens in others:
            if key_id == HEARTBEAT:
                alive += 1
                continue
            t = totals.setdefault((key_id, model), [0.0, 0.0])
            t[0] += requests
            t[1] += tokens
        self._alive = alive
        floor = FLOOR / alive
        for key_id, scopes in self._keys.items():
            for model, s in scopes.items():
                other_r, other_t = totals.get((key_id, model), (0.0, 0.0))
                s.share_requests = _fraction(s.demand_requests, other_r, alive, floor)
                s.share_tokens = _fraction(s.demand_tokens, other_t, alive, floor)
                s.apply(now)

    async def leave(self) -> None:
        """The node stops: its rows go, so the other nodes' shares grow at their next round."""
        await self._store.leave(self._node_id)


def _smooth(old: float, new: float) -> float:
    return SMOOTHING * new + (1 - SMOOTHING) * old


def _fraction(mine: float, others: float, alive: int, floor: float) -> float:
    """This node's part of a limit: its part of the demand; nobody's demand: an equal part."""
    total = mine + others
    if total <= 1e-9:
        return 1.0 / alive
    return min(1.0, max(floor, mine / total))


def _headers(scopes: Sequence[Scope], now: float) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, from the tightest scope of each kind."""
    out: dict[str, str] = {}
    best_r: tuple[int, int, float] | None = None
    best_t: tuple[int, int, float] | None = None
    for s in scopes:
        if s.requests is not None and s.limits.rpm is not None:
            s.requests.refill(now)
            left = s.remaining(s.requests, s.limits.rpm, s.share_requests)
            if best_r is None or left < best_r[1]:
                best_r = (s.limits.rpm, left, s.requests.reset_s())
        if s.tokens is not None and s.limits.tpm is not None:
            s.tokens.refill(now)
            left = s.remaining(s.tokens, s.limits.tpm, s.share_tokens)
            if best_t is None or left < best_t[1]:
                best_t = (s.limits.tpm, left, s.tokens.reset_s())
    for kind, best in (("requests", best_r), ("tokens", best_t)):
        if best is not None:
            out[f"x-ratelimit-limit-{kind}"] = str(best[0])
            out[f"x-ratelimit-remaining-{kind}"] = str(best[1])
            out[f"x-ratelimit-reset-{kind}"] = duration(best[2])
    return out


def duration(seconds: float) -> str:
    """OpenAI's reset format: `250ms`, `1.5s`, `6m0s`."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60.0:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"
