"""An event loop whose clock jumps to the next timer instead of sleeping.

The simulator's engine schedules everything through the loop's clock (`call_at`,
`asyncio.sleep`), so on this loop a test sees exact times (a 2 s prefill ends at 2.0, not at
2.003 on a busy machine) and takes no wall time. No sockets: with nothing scheduled the loop
would wait for I/O forever, so it raises instead.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _InstantSelector(selectors.DefaultSelector):
    """Turns the loop's wait for the next timer into a jump of the virtual clock."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        assert self.loop is not None
        events: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if events:
            return events
        if timeout is None:
            raise RuntimeError("deadlock: nothing scheduled and no I/O to wait for")
        self.loop.now += max(timeout, 0.0)
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0) -> None:
        selector = _InstantSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = start

    def time(self) -> float:
        return self.now


def run_virtual(coro: Coroutine[Any, Any, T], start: float = 0.0) -> T:
    """Runs `coro` to completion on a fresh virtual-time loop."""
    loop = VirtualTimeLoop(start)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
