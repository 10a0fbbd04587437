"""Which backend owns a stored response (Responses API), from the tag its id carries.

vLLM keeps a stored response in memory on the server that made it: a follow-up naming it
(`previous_response_id`, GET, cancel) can only be answered there. The node tags every response
id a backend hands out with the owner's identity and the key's (http/response_ids.py), so any
node, after any restart, sends a follow-up to its owner with no table, no lookup and nothing
to keep coherent. Tags are short digests: they name, they do not authenticate. A client that
forges one only chooses where its own request goes; the key tag keeps one tenant's ids from
working for another (vLLM itself would serve any id to anyone).
"""

from __future__ import annotations

import hashlib
from uuid import UUID

OWNER_TAG_BYTES = 8
KEY_TAG_BYTES = 4


def owner_tag(backend_id: str) -> bytes:
    """A backend's stable identity in an id: its normalised URL, digested (the same on every
    node, as binding rows name backends)."""
    return hashlib.blake2b(
        backend_id.encode(), digest_size=OWNER_TAG_BYTES, person=b"an-owner"
    ).digest()


def key_tag(api_key_id: UUID) -> bytes:
    return hashlib.blake2b(api_key_id.bytes, digest_size=KEY_TAG_BYTES, person=b"an-key").digest()


class OwnerIndex:
    """owner tag -> backend id for the backends a node knows, rebuilt when the list changes."""

    def __init__(self) -> None:
        self._ids: tuple[str, ...] = ()
        self._by_tag: dict[bytes, str] = {}

    def find(self, tag: bytes, backend_ids: tuple[str, ...]) -> str | None:
        if backend_ids != self._ids:
            self._by_tag = {owner_tag(b): b for b in backend_ids}
            self._ids = backend_ids
        return self._by_tag.get(tag)
