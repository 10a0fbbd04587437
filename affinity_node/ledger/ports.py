"""The ledger's port: what it needs from the database (store/ledger_store.py implements it), and the
rows that cross that line (a key and its counts, in the table's column order)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Final, Protocol

from affinity_node.vocabulary import LEDGER_OUTCOMES

LedgerKey = tuple[uuid.UUID, str, str, int]
"""(API key id, canonical model, backend, hour since the epoch)."""
LedgerRow = tuple[LedgerKey, list[int]]
"""A key and its counts, in COUNT_COLUMNS order."""

TOKEN_COLUMNS: Final = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens")
COUNT_COLUMNS: Final = TOKEN_COLUMNS + tuple(f"{o}_requests" for o in LEDGER_OUTCOMES)
"""The ledger table's counters, in the order rows hold them."""


class LedgerUnavailable(Exception):
    """The batch was not added. `rejected`: the database answered and refused it (a
    constraint, a key deleted at that moment); otherwise it did not answer in time."""

    def __init__(self, cause: BaseException, rejected: bool) -> None:
        super().__init__(repr(cause))
        self.rejected = rejected


class LedgerStore(Protocol):
    """What the ledger needs from the database (store/ledger_store.py implements it)."""

    async def add(
        self, writer: uuid.UUID, node_id: str, seq: int, rows: Sequence[LedgerRow]
    ) -> bool:
        """Adds the rows unless `seq` was claimed by `writer` already; True when this call
        added them. Raises LedgerUnavailable."""
        ...

    async def delete_expired(self, older_than_s: float, batch: int) -> int | None:
        """Deletes up to `batch` rows older than that; None when another node is cleaning."""
        ...
