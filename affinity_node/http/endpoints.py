"""Every vLLM endpoint the node serves, and how each is routed (README: "Endpoints").

Affinity pays where a backend reuses a prefix across requests: the generating endpoints
(chat, completions, responses, messages). The pooling, tokenizer and audio endpoints keep no
per-tenant state worth returning to, so they go to the least loaded backend serving the model
(`bypass`), which also keeps one tenant's embedding burst off its chat backend. A request
naming a stored response (Responses API) goes to the backend that stores it, always.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BodyKind = Literal["json", "multipart", "opaque"]
"""json: an object with `model` (checked, fields read lazily); multipart: a form with a
`model` field (audio); opaque: forwarded as received, no model (a stored response's cancel)."""
ErrorShape = Literal["openai", "anthropic"]
StoredUse = Literal["none", "creates", "names"]
"""creates: answers carry response ids (tagged with their owner) and a request may name its
`previous_response_id`; names: the path names a stored response."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    body: BodyKind = "json"
    affinity: bool = False
    errors: ErrorShape = "openai"
    stored: StoredUse = "none"
    ledger: bool = True
    """Recorded in the usage ledger (generation and pooling; not a read of what exists)."""
    injects_usage: bool = False
    """A stream's usage is asked for with `stream_options.include_usage` (chat, completions:
    the other APIs always end their streams with usage)."""
    merges_usage: bool = False
    """A stream's usage comes in two events (Anthropic: message_start and message_delta)."""


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("POST", "/v1/chat/completions", affinity=True, injects_usage=True),
    Endpoint("POST", "/v1/completions", affinity=True, injects_usage=True),
    Endpoint("POST", "/v1/responses", affinity=True, stored="creates"),
    Endpoint("GET", "/v1/responses/{response_id}", "opaque", stored="names", ledger=False),
    Endpoint("POST", "/v1/responses/{response_id}/cancel", "opaque", stored="names", ledger=False),
    Endpoint("POST", "/v1/messages", affinity=True, errors="anthropic", merges_usage=True),
    Endpoint("POST", "/v1/messages/count_tokens", errors="anthropic", ledger=False),
    Endpoint("POST", "/v1/embeddings"),
    Endpoint("POST", "/v1/rerank"),
    Endpoint("POST", "/v1/score"),
    Endpoint("POST", "/v1/audio/transcriptions", "multipart"),
    Endpoint("POST", "/v1/audio/translations", "multipart"),
    Endpoint("POST", "/tokenize", ledger=False),
    Endpoint("POST", "/detokenize", ledger=False),
)
