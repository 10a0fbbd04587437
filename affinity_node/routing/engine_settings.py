"""The affinity engine's settings, shared by its halves (engine.py, coherence.py, upkeep.py);
app.py derives them from the config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineSettings:
    ttl_seconds: float = 1800.0
    refresh_flush_interval_s: float = 1.0
    cleanup_interval_s: float = 60.0
    cleanup_batch: int = 1000
    db_retry_after_s: float = 1.0
    """The breaker's first pause after an outage-like failure (doubles up to 10 s)."""
    max_degraded_pins: int = 10_000
    sweep_interval_s: float = 0.5
    """How often expired entries leave the cache (and the blind clock is checked)."""
    blind_grace_s: float = 3.0
    """A listener down longer than this makes cached entries suspect ..."""
    blind_max_age_s: float = 5.0
    """... and an entry not confirmed by the database for this long is re-read before use."""
    snapshot_page_rows: int = 50_000
    """Rows per statement of a full snapshot (each page is one short, bounded statement: ~50 ms
    for 50,000 rows on a laptop-class server)."""
    snapshot_retry_s: float = 0.2
    """First pause before a failed page is read again (doubles up to 5 s; resumes, never
    restarts)."""
    catchup_max_rows: int = 100_000
    """A catch-up that would read more rows than this reloads in pages instead."""
    deletion_log_retention_s: float = 900.0
    """How long the cleanup leader keeps deletion-log entries: a node whose listener was away
    longer reloads in full."""
    doorbell_batch_s: float = 0.002
    """A doorbell waits this long before its read, so a burst of notifications shares one."""
    doorbell_max_rows: int = 20_000
    """A doorbell's read that would return more rows than this reloads in pages instead."""
    doorbell_retry_s: float = 0.05
    """First pause after a doorbell's read failed (doubles up to 2 s; it is read again)."""
