"""The noisy demo's tally: what its measured window counts."""

from __future__ import annotations

import time

from affinity_node.sim.noisy import Tally


def test_a_request_counts_for_ttft_by_when_it_started_not_when_it_ended() -> None:
    """A limited flood's first second (the unmeasured settle period) queued a request 368 ms
    in vLLM; counted when it ended inside the window, it read as a 9.76x p99."""
    tally = Tally()
    before = time.monotonic()
    tally.open()
    tally.add("small-1", 200, 0.368, "miss", started=before)  # started in the settle period
    tally.add("small-1", 200, 0.030, "hit", started=time.monotonic())
    assert tally.ttft == {"small-1": [0.030]}
    assert tally.hits == {"hit": 1}
    assert len(tally.ok_at["small-1"]) == 2, "both completed in the window: throughput"
    tally.close()
    tally.add("small-1", 200, 0.050, "hit", started=tally.opened)  # started in it, ended after
    assert tally.ttft == {"small-1": [0.030, 0.050]}
    assert len(tally.ok_at["small-1"]) == 2
    assert tally.codes["small-1"][200] == 3


def test_before_the_window_opens_nothing_is_measured() -> None:
    tally = Tally()
    assert not tally.measuring
    tally.add("flood", 200, 0.1, "hit", started=time.monotonic())
    tally.add("flood", 429, None, None, started=time.monotonic())
    assert tally.ttft == {} and tally.ok_at == {}
    assert tally.codes["flood"] == {200: 1, 429: 1}
