"""One HTTP client for every backend: forwarding, health probes and model discovery.

Everything the node sends to a backend goes through `UpstreamClient`, so connection limits,
timeouts and decompression are decided here once. Responses are never decompressed: the proxy
passes bytes through as the backend sent them. Forwarded requests go through the lean
keep-alive pool of http1.py (the hot path); probes and discovery through aiohttp.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from affinity_node.routing.backends import ListedModel
from affinity_node.upstream.http1 import BodyParts, Reply
from affinity_node.upstream.keepalive import ConnectionPool, header_lines

IDLE_REUSE_S = 4.0
"""How long an idle forwarding connection may be reused: under vLLM's keep-alive (uvicorn's,
5 s by default, VLLM_HTTP_TIMEOUT_KEEP_ALIVE), counted from the answer's last byte, so the node
rarely sends a request on a connection the backend is closing at that moment. When it does
(before any byte of the answer), the pool tries once more on a fresh connection to the same
backend: failing over would lose the pair's cache."""


class UpstreamError(Exception):
    """A backend could not be asked or answered something unusable; the message says which."""


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    connect_s: float = 5.0
    read_s: float = 600.0
    """Streams: longest silence before the first chunk and between two chunks."""
    generation_s: float = 300.0
    """Non-streamed answers: vLLM sends nothing, not even headers, until it is done."""
    health_s: float = 2.0
    discovery_s: float = 5.0


class UpstreamClient:
    def __init__(self, timeouts: UpstreamTimeouts | None = None) -> None:
        self.timeouts = t = timeouts or UpstreamTimeouts()
        self._health_timeout = aiohttp.ClientTimeout(total=t.health_s)
        self._discovery_timeout = aiohttp.ClientTimeout(total=t.discovery_s)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=10)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=t.connect_s, sock_read=t.read_s),
        )
        self._connections = ConnectionPool(t.connect_s, keepalive_s=IDLE_REUSE_S)

    async def close(self) -> None:
        await self._connections.close()
        await self._session.close()

    def forget_backend(self, base_url: str) -> None:
        """A backend left the fleet: its pooled forwarding connections go (idle ones now, busy
        ones when their answers end)."""
        self._connections.drop(base_url)

    async def post(
        self,
        base_url: str,
        path: str,
        body: bytes | BodyParts,
        headers: dict[str, str],
        stream: bool,
        method: str = "POST",
    ) -> Reply:
        """Forwards a request; returns once the answer's head is in (use the Reply as `async
        with`). Raises http1.UpstreamTimeout when the backend stays silent for the read timeout
        (the generation timeout for non-streamed answers), http1.UpstreamFailed when it cannot
        be reached or breaks the answer, ValueError on a header that could split the request."""
        timeout = self.timeouts.read_s if stream else self.timeouts.generation_s
        return await self._connections.post(
            base_url, path, header_lines(headers), body, timeout, method
        )

    async def health(self, base_url: str) -> str | None:
        """None when GET /health answers 2xx in time, else why not."""
        try:
            async with self._session.get(
                f"{base_url}/health", timeout=self._health_timeout, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return None
                return f"/health answered {resp.status}"
        except TimeoutError:
            return "/health timed out"
        except (aiohttp.ClientError, OSError) as exc:
            return f"/health failed: {exc.__class__.__name__}: {exc}"

    async def metrics_text(self, base_url: str, timeout_s: float) -> str | None:
        """GET /metrics as text, or None when it does not answer 200 in time."""
        try:
            async with self._session.get(
                f"{base_url}/metrics",
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    return None
                return await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError, UnicodeDecodeError):
            return None

    async def models(self, base_url: str) -> list[ListedModel]:
        """The models GET /v1/models lists (LoRA adapters with their parent); UpstreamError
        when it cannot tell."""
        try:
            async with self._session.get(
                f"{base_url}/v1/models", timeout=self._discovery_timeout, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    raise UpstreamError(f"answered {resp.status}")
                body = await resp.json(content_type=None)
        except TimeoutError:
            raise UpstreamError("timed out") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise UpstreamError(str(exc) or repr(exc)) from None
        return listed_models(body)


def listed_models(body: object) -> list[ListedModel]:
    """The entries of an OpenAI-style model list; UpstreamError on any other shape.

    vLLM lists a LoRA adapter as a model of its own with `parent` = its base model (bases
    have `parent: null`); entries without a usable id are skipped, a non-string parent is
    taken as none.
    """
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise UpstreamError("no 'data' list in the model list")
    listed: list[ListedModel] = []
    for item in data:
        if not isinstance(item, dict):
            continue
        model_id, parent = item.get("id"), item.get("parent")
        if isinstance(model_id, str) and model_id:
            listed.append(
                ListedModel(model_id, parent if isinstance(parent, str) and parent else None)
            )
    return listed


def model_ids(body: object) -> list[str]:
    """The ids of an OpenAI-style model list; UpstreamError on any other shape."""
    return [m.id for m in listed_models(body)]
