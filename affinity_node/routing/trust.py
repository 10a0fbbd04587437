"""Which binding notifications to believe.

Any role that can connect to the database can `pg_notify` on our channel, so a payload is
untrusted input. An event is believed only when it could have come from our trigger: a
backend this node knows, a TTL no longer than the configured one, a version not implausibly
far ahead of the newest this node has seen. Anything else is treated as an invalidation: the
pair is forgotten and the next request reads the row.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from affinity_node.routing.ports import BindingEvent, Clock
from affinity_node.vocabulary import RejectReason

TTL_SLACK_S = 5.0
"""Triggers report the TTL left at commit; a write moments ago may round slightly above."""


class NotificationCheck:
    def __init__(
        self,
        ttl_max_s: float,
        is_known_backend: Callable[[str], bool],
        clock: Clock,
        version_slack: int = 100_000,
        versions_per_s: int = 10_000,
    ) -> None:
        """A version is plausible up to `version_slack` above the newest seen, plus
        `versions_per_s` for every second since that one arrived (the fleet's change rate)."""
        self._ttl_max = ttl_max_s + TTL_SLACK_S
        self._is_known_backend = is_known_backend
        self._clock = clock
        self._slack = version_slack
        self._rate = versions_per_s
        self._newest = 0
        self._newest_at = clock()

    def reason(self, event: BindingEvent, newest_seen: int) -> RejectReason | None:
        """Why `event` is not believed, or None."""
        now = self._clock()
        if newest_seen > self._newest:
            self._newest, self._newest_at = newest_seen, now
        if not (math.isfinite(event.ttl) and math.isfinite(event.sent_at)) or event.version < 0:
            return "malformed"
        if event.op != "delete":
            if not 0.0 <= event.ttl <= self._ttl_max:
                return "ttl"
            if not self._is_known_backend(event.backend):
                return "backend"
        ceiling = self._newest + self._slack + self._rate * max(now - self._newest_at, 0.0)
        if event.version > ceiling:
            return "version"
        return None
