"""Response ids as clients see them: the backend's id with the owner's and the key's tags.

`resp_<backend id>.<tags>`: base64url of the owner tag and the key tag (routing/owners.py)
after a dot, which vLLM's ids (`resp_` and hex) never hold. Every id in an answer is tagged on
its way out (bodies and SSE streams: a regex over the bytes, partial lines held back), and a
tagged id a client sends back is untagged before the backend sees it.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Final
from uuid import UUID

from affinity_node.routing.owners import KEY_TAG_BYTES, OWNER_TAG_BYTES, key_tag, owner_tag

_ID: Final = re.compile(rb'(?<!\\)"(resp_[A-Za-z0-9_-]{1,128})"')
"""A backend's response id as a whole JSON string (not inside another string)."""
_TAG_LEN: Final = len(base64.urlsafe_b64encode(bytes(OWNER_TAG_BYTES + KEY_TAG_BYTES)))
MAX_HELD: Final = 65536


@dataclass(frozen=True, slots=True)
class StoredId:
    """A client's tagged id, read back."""

    backend_id: str
    """The id the backend gave (what it stores the response under)."""
    owner: bytes


def read_id(client_id: str, api_key_id: UUID) -> StoredId | None:
    """The backend's id and owner tag of an id this node (or any node) tagged for this key;
    None for anything else (untagged, damaged, or tagged for another key)."""
    base, dot, tags = client_id.rpartition(".")
    if not dot or len(tags) != _TAG_LEN or not base.startswith("resp_"):
        return None
    try:
        raw = base64.urlsafe_b64decode(tags)
    except (binascii.Error, ValueError):
        return None
    owner, key = raw[:OWNER_TAG_BYTES], raw[OWNER_TAG_BYTES:]
    if key != key_tag(api_key_id):
        return None
    return StoredId(base, owner)


class IdTagger:
    """Tags the response ids of one answer from `backend_id` for `api_key_id`."""

    __slots__ = ("_held", "_suffix")

    def __init__(self, backend_id: str, api_key_id: UUID) -> None:
        tags = base64.urlsafe_b64encode(owner_tag(backend_id) + key_tag(api_key_id))
        self._suffix = b"." + tags
        self._held = b""

    def _sub(self, m: re.Match[bytes]) -> bytes:
        return b'"' + m.group(1) + self._suffix + b'"'

    def body(self, data: bytes) -> bytes:
        """A whole answer."""
        return _ID.sub(self._sub, data) if b'"resp_' in data else data

    def feed(self, chunk: bytes) -> bytes:
        """A stream's next bytes: complete lines tagged, a partial line held until its end."""
        if self._held:
            chunk = self._held + chunk
            self._held = b""
        if not chunk.endswith(b"\n"):
            cut = chunk.rfind(b"\n") + 1
            if len(chunk) - cut <= MAX_HELD:
                chunk, self._held = chunk[:cut], chunk[cut:]
        return self.body(chunk)

    def finish(self) -> bytes:
        held, self._held = self._held, b""
        return self.body(held)


def untag(body: bytes, client_id: str, stored: StoredId) -> bytes:
    """`body` with the tagged id (as a JSON string) replaced by the backend's own."""
    return body.replace(b'"' + client_id.encode() + b'"', b'"' + stored.backend_id.encode() + b'"')
