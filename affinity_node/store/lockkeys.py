"""Advisory lock keys: one 64-bit namespace of our own, derived by hashing.

Advisory locks are shared by every application on the database. Hashing a product-specific
prefix into the bigint space keeps our keys apart from other users' (bigint keys also never
collide with the (int4, int4) form).
"""

from __future__ import annotations

import hashlib
from uuid import UUID

_NAMESPACE = b"affinity-node/v1/"


def _key(*parts: bytes) -> int:
    digest = hashlib.blake2b(_NAMESPACE + b"\x00".join(parts), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def binding_lock_key(api_key_id: UUID, model: str) -> int:
    """The lock a cold miss takes for one (api key, model) pair."""
    return _key(b"binding", api_key_id.bytes, model.encode())


MIGRATE_LOCK = _key(b"migrate")
CLEANUP_LOCK = _key(b"cleanup")
LEDGER_CLEANUP_LOCK = _key(b"ledger-cleanup")
"""One node at a time deletes usage ledger rows past the retention."""
