"""A model of vLLM's automatic prefix caching, pure and synchronous.

vLLM caches the KV state of full 16-token blocks, keyed by a hash that chains the hash of
the previous block with the block's own tokens, so a block only hits when the whole prefix
before it is identical. Blocks live in an LRU of bounded size. This module reproduces that
shape (not vLLM's tokenizer: tokens are an approximation) so that routing with or without
affinity shows the same hit-rate effects as a real fleet.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence

BLOCK_SIZE = 16
"""Tokens per KV-cache block, vLLM's default."""

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Approximates tokens: words and single punctuation marks (deterministic, no model)."""
    return _TOKEN_RE.findall(text)


def stable_hash(data: str) -> int:
    """A 64-bit hash that, unlike `hash()`, is the same in every process."""
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


def block_hashes(
    tokens: Sequence[str], block_size: int = BLOCK_SIZE, namespace: str = ""
) -> list[int]:
    """Chained hashes of the full blocks of `tokens` (a trailing partial block is left out).

    `namespace` seeds the chain, e.g. with the model name, so that two models never share
    blocks (vLLM keys LoRA adapters the same way).
    """
    hashes: list[int] = []
    parent = stable_hash(namespace).to_bytes(8, "big")
    for start in range(0, len(tokens) - block_size + 1, block_size):
        digest = hashlib.blake2b(digest_size=8)
        digest.update(parent)
        for token in tokens[start : start + block_size]:
            digest.update(token.encode())
            digest.update(b"\x00")  # separator: ("ab", "c") != ("a", "bc")
        parent = digest.digest()
        hashes.append(int.from_bytes(parent, "big"))
    return hashes


class PrefixCache:
    """An LRU of block hashes holding at most `capacity_blocks` blocks."""

    def __init__(self, capacity_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be >= 0")
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._blocks

    def clear(self) -> None:
        self._blocks.clear()

    def lookup_and_insert(self, tokens: Sequence[str], namespace: str = "") -> tuple[int, int]:
        """Returns (cached_tokens, total_tokens) and caches every full block of `tokens`.

        The hit is the longest run of cached blocks from the start: chaining makes a block
        after a miss useless even if it happens to be present.
        """
        hashes = block_hashes(tokens, self.block_size, namespace)
        hit_blocks = 0
        for block_hash in hashes:
            if block_hash not in self._blocks:
                break
            hit_blocks += 1
        # Touch the last block first so the first block ends most recently used: eviction
        # then takes the tails of prefixes before their heads, as vLLM's free order does,
        # and a surviving head keeps its prefix useful.
        for block_hash in reversed(hashes):
            self._blocks[block_hash] = None
            self._blocks.move_to_end(block_hash)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
        return hit_blocks * self.block_size, len(tokens)
