"""What the forwarder needs from the upstream client: the seam that lets its retry and SSE
logic be tested without sockets (tests/unit/test_forward.py), and the HTTP/1.1 client in
http1.py be swapped without touching it."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

from multidict import CIMultiDictProxy

from affinity_node.upstream.http1 import BodyParts


class Answer(Protocol):
    """A backend's answer: status and headers are in; the body arrives through `read` (all of
    it) or `readany` (what came since the last call, b"" at the end). Leaving the `async with`
    early abandons it (the backend stops). Both reads raise http1.UpstreamTimeout on silence
    and http1.UpstreamFailed on a broken answer."""

    status: int
    headers: CIMultiDictProxy[str]

    @property
    def drained(self) -> bool: ...

    async def read(self) -> bytes: ...

    async def readany(self) -> bytes: ...

    async def __aenter__(self) -> Answer: ...

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class Transport(Protocol):
    async def post(
        self,
        base_url: str,
        path: str,
        body: bytes | BodyParts,
        headers: dict[str, str],
        stream: bool,
        method: str = "POST",
    ) -> Answer:
        """Sends the request; returns once the answer's head is in. Raises
        http1.UpstreamTimeout / UpstreamFailed as `Answer` does, ValueError on a header that
        could split the request."""
        ...
