"""The active keys, packed: a million of them in ~70 MB, not ~430 MB.

A dict of digest -> UUID (and back) costs ~435 bytes a key in objects (a bytes, a UUID and its
int, two dict slots each way), so a provider with a million keys would pay ~400 MiB per node.
Here a key is an entry in two arrays of 64-bit words (its 32-byte SHA-256, its 16-byte id, the
bytes as received), found through two open-addressing tables of 4-byte entry numbers (linear
probing, deletion by backward shift): one by digest (the request path), one by id
(notifications name ids). A freed entry is reused by the next key. About 48 bytes of entry
plus 11-23 of index a key. A snapshot page is appended in one copy and only indexed key by
key. Building the UUID a hit returns costs ~1 us, so the last few thousand keys asked for keep
theirs in a small memo (dropped with their entry): a busy key costs one dict lookup, as before.

Digests are SHA-256 outputs, so their first word is already uniform; ids are mixed (Fibonacci
hashing of both halves), so time-ordered UUIDs do not cluster.
"""

from __future__ import annotations

import struct
from array import array
from uuid import UUID

DIGEST = 32
"""Bytes of a key's digest (SHA-256)."""
ID = 16
"""Bytes of a key id (a UUID, big-endian)."""

_EMPTY = -1
_MAX_LOAD = 0.7
_MIN_BITS = 4
_LOW64 = (1 << 64) - 1
_FIB = 0x9E3779B97F4A7C15
_MEMO = 4096
"""Keys whose UUID object is kept (the memo is emptied when full: the busy ones come back)."""
_DIGEST_WORDS = struct.Struct("=4Q").unpack
_ID_WORDS = struct.Struct("=2Q").unpack
"""Native order, as array.frombytes reads the same bytes: only equality and spread matter."""


class KeyTable:
    """digest <-> key id, one entry per key, each digest and each id at most once."""

    __slots__ = (
        "_bits",
        "_by_digest",
        "_by_id",
        "_count",
        "_dw",
        "_free",
        "_iw",
        "_mask",
        "_memo",
        "_top",
    )

    def __init__(self, capacity: int = 0) -> None:
        """`capacity`: keys expected (the index is sized for them at once, no regrowth)."""
        self._dw = array("Q")
        """Four words an entry: the digest."""
        self._iw = array("Q")
        """Two words an entry: the id."""
        self._free = array("i")
        self._memo: dict[bytes, UUID] = {}
        """digest -> id of keys asked for lately; every entry dropped leaves it."""
        self._count = 0
        self._top = b""
        """The greatest id ever added (big-endian): a page above it holds only new ids."""
        bits = _MIN_BITS
        while (1 << bits) * _MAX_LOAD < capacity:
            bits += 1
        self._bits = bits
        self._mask = (1 << bits) - 1
        self._by_digest = array("i", [_EMPTY]) * (1 << bits)
        self._by_id = array("i", [_EMPTY]) * (1 << bits)

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes the arrays hold (not counting their over-allocation)."""
        arrays = (self._dw, self._iw, self._free, self._by_digest, self._by_id)
        return sum(a.itemsize * len(a) for a in arrays)

    # -- reading -----------------------------------------------------------------------------

    def get(self, digest: bytes) -> UUID | None:
        """The key id of `digest` (the request path: one probe sequence, no await)."""
        key_id = self._memo.get(digest)
        if key_id is not None or len(digest) != DIGEST:
            return key_id
        e = self._find_digest(_DIGEST_WORDS(digest))[1]
        if e < 0:
            return None
        key_id = UUID(bytes=self._iw[2 * e : 2 * e + 2].tobytes())
        if len(self._memo) >= _MEMO:
            self._memo.clear()
        self._memo[bytes(digest)] = key_id
        return key_id

    def __contains__(self, key_id: UUID) -> bool:
        return self._find_id(_ID_WORDS(key_id.bytes))[1] >= 0

    def digest_of(self, key_id: UUID) -> bytes | None:
        e = self._find_id(_ID_WORDS(key_id.bytes))[1]
        return None if e < 0 else self._dw[4 * e : 4 * e + 4].tobytes()

    # -- writing -----------------------------------------------------------------------------

    def add(self, digest: bytes, key_id: UUID) -> None:
        """Caches the key; an entry holding the same digest or the same id is replaced."""
        if len(digest) != DIGEST:
            raise ValueError("a key digest is 32 bytes")
        packed = key_id.bytes
        d, i = _DIGEST_WORDS(digest), _ID_WORDS(packed)
        de, ie = self._find_digest(d)[1], self._find_id(i)[1]
        if de >= 0 and de == ie:
            return
        for e in {de, ie} - {_EMPTY}:
            self._drop(e)
        self._reserve(1)
        if self._free:
            e = self._free.pop()
            self._dw[4 * e : 4 * e + 4] = array("Q", d)
            self._iw[2 * e : 2 * e + 2] = array("Q", i)
        else:
            e = len(self._iw) // 2
            self._dw.extend(d)
            self._iw.extend(i)
        self._top = max(self._top, packed)
        self._by_digest[self._find_digest(d)[0]] = e
        self._by_id[self._find_id(i)[0]] = e
        self._count += 1

    def add_packed(self, digests: bytes, ids: bytes) -> None:
        """A snapshot page: `digests` 32 bytes a key, `ids` 16, in the same order, ids
        ascending (as the store returns them). A page above every id held is appended in one
        copy and indexed; any other goes key by key."""
        rows = len(ids) // ID
        if len(ids) != rows * ID or len(digests) != rows * DIGEST:
            raise ValueError("a packed page holds 32 digest bytes and 16 id bytes per key")
        if not rows:
            return
        if ids[:ID] <= self._top or ids[-ID:] < ids[:ID]:
            for k in range(rows):
                self.add(
                    digests[k * DIGEST : (k + 1) * DIGEST], UUID(bytes=ids[k * ID : (k + 1) * ID])
                )
            return
        self._reserve(rows)
        base = len(self._iw) // 2
        self._dw.frombytes(digests)
        self._iw.frombytes(ids)
        self._top = ids[-ID:]
        self._index_new(base, base + rows)

    def remove(self, key_id: UUID) -> bool:
        """Forgets the key; False when it was not cached."""
        e = self._find_id(_ID_WORDS(key_id.bytes))[1]
        if e < 0:
            return False
        self._drop(e)
        return True

    def _index_new(self, first: int, end: int) -> None:
        """Indexes entries `first`..`end` (appended, their ids new): the snapshot's loop."""
        dw, iw, by_digest, by_id = self._dw, self._iw, self._by_digest, self._by_id
        mask, shift = self._mask, 64 - self._bits
        for e in range(first, end):
            o = 4 * e
            w0 = dw[o]
            i = w0 & mask
            while (f := by_digest[i]) != _EMPTY:
                if dw[4 * f] == w0 and dw[4 * f + 1 : 4 * f + 4] == dw[o + 1 : o + 4]:
                    self._drop(f)  # re-created under a new id between pages: the newer wins
                    i = w0 & mask
                    continue
                i = (i + 1) & mask
            by_digest[i] = e
            i = (((iw[2 * e] ^ iw[2 * e + 1]) * _FIB) & _LOW64) >> shift
            while by_id[i] != _EMPTY:
                i = (i + 1) & mask
            by_id[i] = e
            self._count += 1

    def _drop(self, e: int) -> None:
        if self._memo:
            self._memo.pop(self._dw[4 * e : 4 * e + 4].tobytes(), None)
        by_digest, by_id = self._by_digest, self._by_id
        self._unlink(by_digest, self._slot_of(by_digest, self._dw[4 * e] & self._mask, e))
        self._unlink(by_id, self._slot_of(by_id, self._id_home(e), e))
        self._free.append(e)
        self._count -= 1

    def _reserve(self, more: int) -> None:
        """Grows the index (doubling) until `more` keys fit under the load bound."""
        bits = self._bits
        while (self._count + more) > (1 << bits) * _MAX_LOAD:
            bits += 1
        if bits == self._bits:
            return
        old = self._by_digest  # walked as it is (a list of its entries would be an int each)
        self._bits, self._mask = bits, (1 << bits) - 1
        self._by_digest = array("i", [_EMPTY]) * (1 << bits)
        self._by_id = array("i", [_EMPTY]) * (1 << bits)
        by_digest, by_id, dw, iw = self._by_digest, self._by_id, self._dw, self._iw
        mask, shift = self._mask, 64 - bits
        for e in old:
            if e == _EMPTY:
                continue
            i = dw[4 * e] & mask
            while by_digest[i] != _EMPTY:
                i = (i + 1) & mask
            by_digest[i] = e
            i = (((iw[2 * e] ^ iw[2 * e + 1]) * _FIB) & _LOW64) >> shift
            while by_id[i] != _EMPTY:
                i = (i + 1) & mask
            by_id[i] = e

    # -- probing -----------------------------------------------------------------------------

    def _find_digest(self, d: tuple[int, ...]) -> tuple[int, int]:
        """(slot, entry): the slot holding digest words `d`'s entry, or the empty one ending
        its run (entry -1)."""
        index, dw, mask = self._by_digest, self._dw, self._mask
        w0, w1, w2, w3 = d
        i = w0 & mask
        while True:
            e = index[i]
            if e == _EMPTY:
                return i, e
            o = 4 * e
            if dw[o] == w0 and dw[o + 1] == w1 and dw[o + 2] == w2 and dw[o + 3] == w3:
                return i, e
            i = (i + 1) & mask

    def _find_id(self, words: tuple[int, ...]) -> tuple[int, int]:
        index, iw, mask = self._by_id, self._iw, self._mask
        w0, w1 = words
        i = (((w0 ^ w1) * _FIB) & _LOW64) >> (64 - self._bits)
        while True:
            e = index[i]
            if e == _EMPTY or (iw[2 * e] == w0 and iw[2 * e + 1] == w1):
                return i, e
            i = (i + 1) & mask

    def _id_home(self, e: int) -> int:
        return (((self._iw[2 * e] ^ self._iw[2 * e + 1]) * _FIB) & _LOW64) >> (64 - self._bits)

    def _slot_of(self, index: array[int], i: int, e: int) -> int:
        mask = self._mask
        while index[i] != e:
            i = (i + 1) & mask
        return i

    def _unlink(self, index: array[int], i: int) -> None:
        """Empties slot `i`, moving later entries of its run back so no probe stops short."""
        mask = self._mask
        by_digest = index is self._by_digest
        j = i
        while True:
            j = (j + 1) & mask
            e = index[j]
            if e == _EMPTY:
                break
            k = self._dw[4 * e] & mask if by_digest else self._id_home(e)
            # The entry at j may stay when its home lies cyclically in (i, j].
            if (i < k <= j) if i <= j else (k > i or k <= j):
                continue
            index[i] = e
            i = j
        index[i] = _EMPTY


class KeyTableLoad:
    """A snapshot being read: its pages appended as they arrive (one copy each), indexed once
    after the last, sized for what arrived, so the index is built once and never regrown
    (regrowth costs time and leaves freed blocks behind in the process)."""

    __slots__ = ("_dw", "_iw", "_top")

    def __init__(self) -> None:
        self._dw = array("Q")
        self._iw = array("Q")
        self._top = b""

    def add_page(self, digests: bytes, ids: bytes) -> None:
        """A page of the store's snapshot: ids ascending, all above the previous page's."""
        rows = len(ids) // ID
        if len(ids) != rows * ID or len(digests) != rows * DIGEST:
            raise ValueError("a packed page holds 32 digest bytes and 16 id bytes per key")
        if not rows:
            return
        if ids[:ID] <= self._top or ids[-ID:] < ids[:ID]:
            raise ValueError("key snapshot pages must come in ascending id order")
        self._dw.frombytes(digests)
        self._iw.frombytes(ids)
        self._top = ids[-ID:]

    def table(self) -> KeyTable:
        """The loaded keys, indexed (the load's arrays move into the table)."""
        rows = len(self._iw) // 2
        table = KeyTable(capacity=rows)
        table._dw, table._iw, table._top = self._dw, self._iw, self._top
        self._dw, self._iw, self._top = array("Q"), array("Q"), b""
        table._index_new(0, rows)
        return table
