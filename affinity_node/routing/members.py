"""Which member of a pair's backend set serves a request: the same one for a conversation on
every node, and few conversations move when the set grows.

Rendezvous (highest random weight) hashing of a conversation key over the members: each member
scores hash(key, member) and the highest wins. Adding a member moves only the conversations it
now wins, about 1/k of them; removing one moves only its own.

The conversation key is what the client says identifies the conversation (OpenAI's
`prompt_cache_key`, else an `x-session-id` header), else its opening: the system prompt and the
first user message for chat, the first characters of a completion prompt. Every turn of a chat
starts with the same opening, so a conversation keeps its member without any state.

Placement of a new conversation (its first turn: `first_turn`) is load-aware (`place`): when
its rendezvous member has a queue, it goes to the least-loaded member, the rendezvous order
breaking ties (within `PLACEMENT_MARGIN`). Every other turn must find that member again, on
any node, and the choice depended on the load of one moment on one node. Trade-off chosen:
a member without a queue keeps its new conversations (reproducible everywhere, no state);
only a conversation diverted off a queueing member is remembered, in this node's bounded
`Placements` (no database write, no NOTIFY: NOTIFY must stay rare). A later turn of a
diverted conversation that lands on another node goes to its rendezvous member: it loses
that conversation's own history from the cache (the tenant's shared prefix is cached on every
member). Skew-demo runs (3 nodes) diverting on load alone (margin 2 or 4 requests, no queue
needed) cost 0.5-1 point of prefix-cache hit rate for that reason, and nodes placing from the
same 1 s load poll herded new conversations onto one member; hence the queue condition.
Sharing diversions fleet-wide (a table read on a later turn's miss) would make them exact, at
a database round trip on such turns: not done.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

OPENING_CHARS = 400
"""How much of a completion prompt (or of each opening chat message) names a conversation."""

PLACEMENT_MARGIN = 4.0
"""Requests (running and waiting) above the least-loaded member that still count as a tie."""

PLACEMENTS_KEPT = 65_536
"""Diverted conversations one node remembers (~100 bytes each); beyond, the oldest go."""


def rendezvous(key: bytes, members: Sequence[str]) -> str:
    """The member with the highest score for `key`; `members` must not be empty."""
    best = members[0]
    best_score = -1
    for member in members:
        score = _score(key, member)
        if score > best_score:
            best, best_score = member, score
    return best


def _score(key: bytes, member: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(member.encode(), key=key[:64], digest_size=8).digest(), "big"
    )


def place(
    key: bytes,
    members: Sequence[str],
    load: Callable[[str], float],
    queued: Callable[[str], bool],
) -> str:
    """A new conversation's member: its rendezvous member unless that one has a queue; then
    the first in its rendezvous order whose load is within `PLACEMENT_MARGIN` of the least
    loaded member's. `members` must not be empty."""
    ranked = sorted(members, key=lambda m: _score(key, m), reverse=True)
    if not queued(ranked[0]):
        return ranked[0]
    loads = {m: load(m) for m in members}
    bound = min(loads.values()) + PLACEMENT_MARGIN
    return next(m for m in ranked if loads[m] <= bound)


class Placements:
    """Conversations this node placed off their rendezvous member, most recent last."""

    def __init__(self, capacity: int = PLACEMENTS_KEPT) -> None:
        self._capacity = capacity
        self._members: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._members)

    def get(self, key: bytes) -> str | None:
        member = self._members.get(key)
        if member is not None:
            self._members.move_to_end(key)
        return member

    def put(self, key: bytes, member: str | None) -> None:
        """Remembers `member` for `key`; None forgets it (placed on its rendezvous member)."""
        if member is None:
            self._members.pop(key, None)
            return
        self._members[key] = member
        self._members.move_to_end(key)
        if len(self._members) > self._capacity:
            self._members.popitem(last=False)


_LATER_ROLES = frozenset({"assistant", "tool", "function"})
_LATER_ITEMS = frozenset({"function_call", "function_call_output", "reasoning"})


def first_turn(payload: Fields) -> bool:
    """Whether the request opens a conversation: a chat (or Anthropic messages) with one user
    message and nothing answered yet, or a Responses request that names no previous response
    and carries no earlier output. A completion prompt cannot tell: never."""
    if payload.get("previous_response_id"):
        return False
    messages = payload.get("messages")
    if messages is None:
        messages = payload.get("input")
        if isinstance(messages, str):
            return True
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return False
    users = 0
    for i in range(len(messages) - 1, -1, -1):  # from the end: a later turn's answer is near
        message = messages[i]
        if not isinstance(message, dict):
            return False
        role = message.get("role")
        if role in _LATER_ROLES or message.get("type") in _LATER_ITEMS:
            return False
        users += role == "user"
        if users > 1:
            return False
    return users == 1


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content[:OPENING_CHARS]
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))[:OPENING_CHARS]
    return ""


class Fields(Protocol):
    """A request body's top-level values (a dict, or the proxy's lazily decoded payload)."""

    def get(self, key: str, default: Any = None, /) -> Any: ...


def conversation_key(payload: Fields, session: str | None) -> bytes:
    """What identifies the conversation a request belongs to, first found of: `prompt_cache_key`
    (OpenAI, Responses), `previous_response_id` (Responses; such a turn goes to the response's
    owner anyway), `metadata.user_id` (Anthropic), the `x-session-id` header, the opening of
    the conversation (see the module's docstring)."""
    explicit = payload.get("prompt_cache_key")
    if isinstance(explicit, str) and explicit:
        return b"k:" + hashlib.blake2b(explicit.encode(), digest_size=16).digest()
    previous = payload.get("previous_response_id")
    if isinstance(previous, str) and previous:
        return b"r:" + hashlib.blake2b(previous.encode(), digest_size=16).digest()
    metadata = payload.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    if isinstance(user, str) and user:
        return b"u:" + hashlib.blake2b(user.encode(), digest_size=16).digest()
    if session:
        # The header's own bytes: aiohttp keeps undecodable ones as surrogate escapes.
        raw = session.encode("utf-8", "surrogateescape")
        return b"s:" + hashlib.blake2b(raw, digest_size=16).digest()
    return b"o:" + hashlib.blake2b("\x00".join(_opening(payload)).encode(), digest_size=16).digest()


def _opening(payload: Fields) -> list[str]:
    """The system prompt (chat's system or developer messages, Anthropic's `system`,
    Responses' `instructions`) and the first user message, or a completion prompt's start."""
    opening: list[str] = []
    for key in ("system", "instructions"):
        value = payload.get(key)
        if value is not None:
            opening.append(_text(value))
    messages = payload.get("messages")
    if messages is None:
        messages = payload.get("input")
        if isinstance(messages, str):
            return [*opening, messages[:OPENING_CHARS]]
    if isinstance(messages, Sequence) and not isinstance(messages, str):
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            if role in ("system", "developer"):
                opening.append(_text(message.get("content")))
            elif role == "user":
                opening.append(_text(message.get("content")))
                break
        return opening
    prompt = payload.get("prompt")
    if isinstance(prompt, Sequence) and not isinstance(prompt, str) and prompt:
        prompt = prompt[0]
    if isinstance(prompt, str):
        opening.append(prompt[:OPENING_CHARS])
    return opening
