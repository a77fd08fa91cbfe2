"""Simulated automatic prefix caching, as much of it as usage reporting shows.

Like vLLM: prompts are cut into full blocks of `block_size` tokens, each block keyed by a hash
chained over all blocks before it; a request's cached_tokens is the run of leading blocks already
seen. Even on a full hit vLLM recomputes the last prompt token, so cached_tokens is at most the
largest block multiple below the prompt length. After a request, the blocks of prompt + output
are cached (so a follow-up chat turn that replays the answer hits too). LRU-evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    def __init__(self, block_size: int = 16, capacity_blocks: int = 100_000) -> None:
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def _hashes(self, ids: Sequence[int]) -> list[int]:
        bs, h, out = self.block_size, 0, []
        for start in range(0, len(ids) - len(ids) % bs, bs):
            h = hash((h, tuple(ids[start : start + bs])))
            out.append(h)
        return out

    def match(self, prompt_ids: Sequence[int]) -> int:
        """Cached prompt tokens for this prompt (a multiple of block_size)."""
        hits = 0
        for h in self._hashes(prompt_ids):
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            hits += 1
        limit = max(len(prompt_ids) - 1, 0) // self.block_size * self.block_size
        return min(hits * self.block_size, limit)

    def insert(self, ids: Sequence[int]) -> None:
        for h in self._hashes(ids):
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
