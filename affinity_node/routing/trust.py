"""What a binding notification may tell a node: that something changed, nothing more.

Any role that can connect to the database can `pg_notify` on our channel, and a plausible
forgery (a known backend, a real TTL, version + 1) cannot be told from the real thing. So no
payload moves a pair, evicts one or raises a version or a watermark: a notification is a
doorbell, and the node reads what changed from the table (coherence.py). The payload only hints
where that read may start and, for the lag histogram, when the change committed; both hints
are bounded here so that a forged one costs at most the read the node would make anyway.
"""

from __future__ import annotations

import math

MAX_PLAUSIBLE_LAG_S = 3600.0
"""A lag beyond this is a forged or broken `sent_at`: not observed (it would only pollute
the histogram)."""


def read_start(watermark: int, newest_seen: int, claimed_version: int) -> int:
    """The version a catch-up must read after for this doorbell.

    A real change with version v committed out of order may be older than the newest version
    this node holds, so the read starts before v; but never below the watermark (every change
    up to it is applied already), so a forged low version costs no more than a read from the
    watermark, and a forged high one no more than a read of the newest rows.
    """
    return max(watermark, min(claimed_version - 1, newest_seen))


def plausible_lag(sent_at: float, now: float) -> float | None:
    """Seconds from the trigger to now by the database clock, or None when `sent_at` cannot be
    a real trigger time."""
    if not math.isfinite(sent_at):
        return None
    lag = now - sent_at
    if lag > MAX_PLAUSIBLE_LAG_S:
        return None
    return max(lag, 0.0)
