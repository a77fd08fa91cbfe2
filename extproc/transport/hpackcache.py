"""Memoized HPACK decoding for repeated header blocks.

Envoy opens every ext_proc stream with the same header block bytes (indexed fields, and :path as
a literal *without* indexing); hpack's pure-Python Huffman decoding of it costs ~20 µs. A block
with no incremental-indexing literal and no table size update cannot change the dynamic table,
so its decoded form stays valid until some other block changes the table, which clears the cache.
"""

from __future__ import annotations

from typing import cast

from hpack import Decoder

Headers = list[tuple[bytes, bytes]]


def _skip_int(block: bytes, i: int, prefix_mask: int) -> int:
    if block[i] & prefix_mask != prefix_mask:
        return i + 1
    i += 1
    while block[i] & 0x80:
        i += 1
    return i + 1


def _skip_string(block: bytes, i: int) -> int:
    length = block[i] & 0x7F
    i += 1
    if length == 0x7F:
        shift = 0
        while True:
            c = block[i]
            i += 1
            length += (c & 0x7F) << shift
            shift += 7
            if not c & 0x80:
                break
    return i + length


def table_neutral(block: bytes) -> bool:
    """True if decoding `block` leaves the HPACK dynamic table unchanged (RFC 7541 section 6)."""
    i, n = 0, len(block)
    try:
        while i < n:
            b = block[i]
            if b & 0x80:  # indexed field
                i = _skip_int(block, i, 0x7F)
            elif b & 0xC0 == 0x40 or b & 0xE0 == 0x20:  # incremental indexing, size update
                return False
            else:  # literal without indexing / never indexed
                new_name = not b & 0x0F
                i = _skip_int(block, i, 0x0F)
                if new_name:
                    i = _skip_string(block, i)
                i = _skip_string(block, i)
    except IndexError:
        return False
    return i == n


class CachingDecoder:
    __slots__ = ("decoder", "_cache", "_max")

    def __init__(self, max_header_list_size: int, max_entries: int = 256) -> None:
        self.decoder = Decoder(max_header_list_size=max_header_list_size)
        self._cache: dict[bytes, Headers] = {}
        self._max = max_entries

    def decode(self, block: bytes) -> Headers:
        """Raises hpack.HPACKError on a bad block. The result is shared: do not mutate it."""
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        # raw=True: (bytes, bytes) tuples, which the stubs cannot express
        headers = cast(Headers, self.decoder.decode(block, raw=True))
        if not table_neutral(block):
            self._cache.clear()
        elif len(self._cache) < self._max:
            self._cache[block] = headers
        return headers
