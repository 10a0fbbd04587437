"""The harness's ports: a child binds its port after the harness picked it, so the pick must
not be one the kernel can hand to an outgoing connection meanwhile (the scale demo's node lost
its port to one in CI)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from affinity_node.sim.support import free_port

RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def test_ports_are_distinct_and_bindable() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


@pytest.mark.skipif(not RANGE.exists(), reason="no Linux ephemeral port range to avoid")
def test_ports_are_outside_the_ephemeral_range() -> None:
    low, high = (int(x) for x in RANGE.read_text().split())
    ports = [free_port() for _ in range(50)]
    assert not [p for p in ports if low <= p <= high]
