"""The periodic-task and stop helpers (affinity_node/tasks.py): when the first round runs, a
failing round neither ends the task nor hides, and stopping waits for the end without
swallowing the stopper's own cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from affinity_node.tasks import Pending, every, stop_all, stopping
from tests.support.waiting import wait_for


async def test_first_round_after_one_interval_by_default_and_at_once_with_now() -> None:
    calls: list[float] = []

    async def tick() -> None:
        calls.append(time.monotonic())

    started = time.monotonic()
    late = every(0.2, tick, "late", jitter=0.0)
    soon = every(30.0, tick, "soon", now=True)
    await wait_for(lambda: soon.runs == 1, what="the immediate round")
    assert late.runs == 0  # 0.2 s have not passed yet: the default waits one interval
    await wait_for(lambda: late.runs == 1, what="the first periodic round")
    assert calls[-1] - started >= 0.2
    await stop_all(late, soon)
    assert late.task.done() and soon.task.done()


async def test_a_failing_round_is_counted_and_logged_and_the_task_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds = 0

    async def flaky() -> None:
        nonlocal rounds
        rounds += 1
        if rounds % 2:
            raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="affinity_node.tasks"):
        task = every(0.01, flaky, "flaky", now=True)
        async with stopping(task):
            await wait_for(lambda: task.runs >= 6, what="six rounds")
    assert task.task.done()
    assert task.errors == (task.runs + 1) // 2
    logged = [r for r in caplog.records if "flaky: round failed" in r.getMessage()]
    assert len(logged) == 1  # rate-limited: one line (with its traceback) per 10 s
    assert logged[0].exc_info is not None


async def test_stop_all_waits_for_the_end_and_reports_a_task_that_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cleaned = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.05)  # cleanup that takes a while
            cleaned.set()

    async def broken() -> None:
        raise ValueError("bad")

    slow = asyncio.create_task(slow_to_stop())
    failed = asyncio.create_task(broken())
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="affinity_node.tasks"):
        await stop_all(slow, failed, None)
    assert cleaned.is_set()  # returned only after the cleanup ran
    assert any("failed" in r.getMessage() for r in caplog.records)


async def test_stop_all_lets_the_stoppers_own_cancellation_through() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # takes its time to end

    child = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop_all(child))
    await wait_for(lambda: child.cancelling() > 0, what="the child to be cancelled")
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    release.set()
    await wait_for(child.done, what="the child to end")


async def test_a_plain_function_runs_too() -> None:
    seen: list[int] = []
    task = every(0.01, lambda: seen.append(1), "plain", now=True)
    async with stopping(task):
        await wait_for(lambda: len(seen) >= 2, what="two rounds")
    assert task.errors == 0


def test_bad_settings_are_refused() -> None:
    async def nothing() -> None:
        return None

    async def make(interval: float, jitter: float) -> None:
        every(interval, nothing, "bad", jitter=jitter)

    for interval, jitter in ((0.0, 0.1), (1.0, 1.0), (1.0, -0.1)):
        with pytest.raises(ValueError):
            asyncio.run(make(interval, jitter))


async def test_pending_tasks_are_let_finish_not_cancelled() -> None:
    release = asyncio.Event()
    done: list[str] = []

    async def write(name: str) -> None:
        await release.wait()
        done.append(name)

    async def broken() -> None:
        raise RuntimeError("boom")

    pending = Pending()
    pending.start(write("a"), "write-a")
    pending.start(write("b"), "write-b")
    pending.start(broken(), "broken")
    await wait_for(lambda: len(pending) == 2, what="the broken one to end")
    finishing = asyncio.create_task(pending.finish())
    await asyncio.sleep(0)
    assert not finishing.done()  # it waits for the writes, it does not cancel them
    release.set()
    await asyncio.wait_for(finishing, 5)
    assert sorted(done) == ["a", "b"] and len(pending) == 0


async def test_stop_all_does_not_wait_past_its_grace_for_a_task_stuck_in_its_cancellation() -> None:
    """A task cancelled inside a database call may wait on the driver's own cancellation, which
    a frozen server never confirms: a node's stop must not wait for it forever."""
    release = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await release.wait()  # the driver waiting for the server to confirm the cancel
            raise

    task = asyncio.ensure_future(stubborn())
    await asyncio.sleep(0)
    await stop_all(task, grace_s=0.05)
    assert not task.done()  # left cancelling; the stop went on
    release.set()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
