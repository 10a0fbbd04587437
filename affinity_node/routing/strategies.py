"""Fallback strategies: pick a backend for a new binding, or whenever affinity cannot.

Called once per request that is not a cache hit, so `choose` allocates nothing and makes at
most two passes over a handful of candidates.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar, Protocol

from affinity_node.routing.backends import Backend
from affinity_node.vocabulary import STRATEGY_NAMES, StrategyName


class Strategy(Protocol):
    name: ClassVar[StrategyName]

    def choose(self, candidates: Sequence[Backend]) -> Backend:
        """One of `candidates`; ValueError when there are none."""


def _require(candidates: Sequence[Backend]) -> None:
    if not candidates:
        raise ValueError("no candidate backends to choose from")


class LeastOutstanding:
    """Fewest requests in flight; ties taken in turn, so an idle fleet still spreads load
    instead of piling every new binding on the first backend listed."""

    name: ClassVar[StrategyName] = "least_outstanding"
    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[Backend]) -> Backend:
        _require(candidates)
        low = candidates[0].inflight
        ties = 0
        for backend in candidates:
            n = backend.inflight
            if n < low:
                low, ties = n, 1
            elif n == low:
                ties += 1
        pick = self._turn % ties
        self._turn += 1
        for backend in candidates:
            if backend.inflight == low:
                if pick == 0:
                    return backend
                pick -= 1
        raise AssertionError("unreachable: a tie was counted but not found")


class RoundRobin:
    """Each candidate in turn; one counter for all models, which spreads well enough."""

    name: ClassVar[StrategyName] = "round_robin"
    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[Backend]) -> Backend:
        _require(candidates)
        backend = candidates[self._turn % len(candidates)]
        self._turn += 1
        return backend


class RandomChoice:
    """Uniform choice; its own generator, so a seed makes tests and benchmarks repeatable."""

    name: ClassVar[StrategyName] = "random"
    __slots__ = ("_rng",)

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[Backend]) -> Backend:
        _require(candidates)
        return self._rng.choice(candidates)


def make_strategy(name: StrategyName, *, seed: int | None = None) -> Strategy:
    """The strategy `routing.fallback` names; `seed` only affects `random`."""
    if name == "least_outstanding":
        return LeastOutstanding()
    if name == "round_robin":
        return RoundRobin()
    if name == "random":
        return RandomChoice(seed)
    raise ValueError(
        f"unknown routing.fallback strategy {name!r}; expected one of {', '.join(STRATEGY_NAMES)}"
    )
