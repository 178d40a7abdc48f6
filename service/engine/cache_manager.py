"""Who owns which KV-cache slot, and what a free slot still holds. The cache is preallocated (max_slots x max_len
positions), so memory is bounded and known at start-up; a sequence holds one slot from admission until it finishes.

Prefix reuse (llama.cpp's slot reuse): a freed slot remembers the token ids whose keys and values it still holds
(its last owner's prompt and output, as far as they were written). A new sequence gets the free slot sharing the
longest prefix with its prompt and skips computing those positions; the next turn of a conversation, whose prompt
extends the previous prompt and answer, recomputes only the new message. (A prompt that begins as another slot
holds, a running sequence's or a free one it did not get, copies from it: the scheduler's `_Prefixes`.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


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
        self._free = set(range(max_slots))
        self._tokens: dict[int, int] = {}  # slot -> positions its owner has in use
        self._held: dict[int, list[int]] = {}  # free slot -> token ids at its positions 0.. (valid KV)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """The lowest free slot: running sequences then tend to sit in contiguous slots, which lets the model read
        the cache as a view instead of gathering."""
        return self.allocate_for([])[0]

    def allocate_for(self, prompt_ids: list[int]) -> tuple[int, int]:
        """(slot, shared): the free slot whose remembered tokens share the longest prefix with `prompt_ids` (the
        lowest slot on a tie or when none does), and how many leading positions of it hold the prompt's KV."""
        if not self._free:
            raise RuntimeError("no free KV cache slot (the scheduler must check num_free first)")
        slot, shared = min(self._free), 0
        if prompt_ids and self._held:
            for s in sorted(self._held):
                n = common_prefix(self._held[s], prompt_ids)
                if n > shared:
                    slot, shared = s, n
        self._free.remove(slot)
        self._held.pop(slot, None)
        self._tokens[slot] = 0
        return slot, shared

    @property
    def held(self) -> Mapping[int, list[int]]:
        """Free slot -> the token ids whose KV it holds at positions 0.. (read-only)."""
        return MappingProxyType(self._held)

    def set_tokens(self, slot: int, n: int) -> None:
        self._tokens[slot] = n

    def free(self, slot: int, held: list[int] | None = None) -> None:
        """Release `slot`; `held` are the token ids whose KV it holds at positions 0.. (None: nothing reusable)."""
        if slot not in self._tokens:
            raise ValueError(f"slot {slot} is not allocated")
        del self._tokens[slot]
        self._free.add(slot)
        if held:
            self._held[slot] = held

    def forget(self) -> None:
        """The KV cache was cleared (a model swap): no free slot holds anything reusable."""
        self._held.clear()

    def usage(self) -> CacheUsage:
        return CacheUsage(
            slots_used=len(self._tokens),
            slots_total=self.max_slots,
            tokens_used=sum(self._tokens.values()),
            tokens_total=self.max_slots * self.max_len,
        )


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share; slices compared in halves (C loops, not a Python one per token)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo
