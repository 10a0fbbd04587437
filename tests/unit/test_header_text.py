"""Header text that is not ASCII (issue 21, defect 3), at the functions that read it."""

from __future__ import annotations

import pytest

from affinity_node.auth.secrets import bearer_secret
from affinity_node.routing.members import conversation_key


def as_aiohttp_reads(raw: bytes) -> str:
    """A header value as aiohttp hands it over: UTF-8, undecodable bytes as surrogates."""
    return raw.decode("utf-8", "surrogateescape")


def test_a_session_id_of_any_bytes_is_hashed_as_received() -> None:
    undecodable = conversation_key({}, as_aiohttp_reads(b"s-\xff"))
    assert undecodable.startswith(b"s:")
    assert undecodable != conversation_key({}, as_aiohttp_reads(b"s-\xfe"))
    assert conversation_key({}, as_aiohttp_reads("s-\u20ac".encode())) == conversation_key(
        {}, "s-\u20ac"
    )


@pytest.mark.parametrize("raw", [b"Bearer \xff", b"Bearer sk-\xc3\xa9", b"Bearer sk-\x7f"])
def test_a_key_that_is_not_printable_ascii_is_malformed(raw: bytes) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        bearer_secret(as_aiohttp_reads(raw))
    assert bearer_secret("Bearer sk-ok") == "sk-ok"
