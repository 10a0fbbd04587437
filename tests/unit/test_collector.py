"""The cyclic collector once a node serves (app.settle_collector): start-up objects frozen out
of its sight, the youngest generation collected rarely. The test restores Python's settings."""

from __future__ import annotations

import gc

from affinity_node.app import GC_THRESHOLDS, settle_collector


def test_a_serving_node_freezes_what_start_up_built_and_collects_rarely() -> None:
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        built_at_start = [{"key": i} for i in range(1000)]
        settle_collector()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() >= len(built_at_start)
        tracked = set(map(id, gc.get_objects()))
        assert id(built_at_start[0]) not in tracked, "frozen: no collection walks it"
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
