"""The chaos soak as CI runs it: 60 seconds, every fault, every must-be-zero column zero."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


@pytest.mark.timeout(400)
def test_a_sixty_second_soak_loses_nothing_a_healthy_fleet_could_serve(tmp_path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "affinity_node",
            "chaos",
            "--duration",
            "60",
            "--json",
            "--log-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    phases = json.loads(proc.stdout)
    assert [p["name"] for p in phases] == [
        "baseline",
        "postgres_stopped",
        "postgres_frozen",
        "listeners_terminated",
        "backend_killed",
        "node_killed",
        "keys_churned",
        "hostile_notify",
        "reader_held",
        "large_answers",
        "stalled_reader",
        "token_flood",
    ]
    for p in phases:
        assert p["requests"] > 50, p  # the load kept going through every fault
        assert (p["failures"], p["split"], p["revoked_late"]) == (0, 0, 0), p
        assert p["converge_s"] is not None, p  # every cache equals the table again
    assert phases[-1]["flood_statements"] == 0
    assert "listener session(s) terminated" in " ".join(phases[3]["notes"])
    assert "reader held" in " ".join(phases[8]["notes"])  # and the fleet did not notice
    notes = {p["name"]: " ".join(p["notes"]) for p in phases}
    # Answers past the 256 KB pause, with small requests reusing their connections: none hung.
    assert re.search(r"\b[1-9]\d* answers of 300-600 KB .*; 0 hung past", notes["large_answers"])
    # A client that never reads a 16 MB answer: dropped within the write timeout's bound.
    assert "closed by the node after" in notes["stalled_reader"], notes["stalled_reader"]
    assert "backend slot free while stalled: yes" in notes["stalled_reader"]
