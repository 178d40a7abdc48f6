"""Who owns which KV-cache slot. The cache is preallocated (max_slots x max_len positions), so memory is
bounded and known at start-up; a sequence holds one slot from admission until it finishes."""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True)
class CacheUsage:
    slots_used: int
    slots_total: int
    tokens_used: int
    tokens_total: int


class CacheManager:
    def __init__(self, max_slots: int, max_len: int) -> None:
        if max_slots < 1 or max_len < 1:
            raise ValueError(f"cache needs max_slots >= 1 and max_len >= 1, got {max_slots}, {max_len}")
        self.max_slots = max_slots
        self.max_len = max_len
        # Lowest free slot first: running sequences then tend to sit in contiguous slots, which lets the model
        # read the cache as a view instead of gathering.
        self._free = list(range(max_slots))
        self._tokens: dict[int, int] = {}  # slot -> positions its owner has in use

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV cache slot (the scheduler must check num_free first)")
        slot = heapq.heappop(self._free)
        self._tokens[slot] = 0
        return slot

    def set_tokens(self, slot: int, n: int) -> None:
        self._tokens[slot] = n

    def free(self, slot: int) -> None:
        if slot not in self._tokens:
            raise ValueError(f"slot {slot} is not allocated")
        del self._tokens[slot]
        heapq.heappush(self._free, slot)

    def usage(self) -> CacheUsage:
        return CacheUsage(
            slots_used=len(self._tokens),
            slots_total=self.max_slots,
            tokens_used=sum(self._tokens.values()),
            tokens_total=self.max_slots * self.max_len,
        )
