"""Waiting on a condition with a deadline: the only way tests here wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.005,
) -> float:
    """Polls `condition` until true; returns the seconds it took; fails at the deadline."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
