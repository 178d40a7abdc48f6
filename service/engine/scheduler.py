"""Who runs next step: waiting and running queues, admission while cache slots are free, prefill chunks.

The scheduler never touches tensors; it hands the runner a `Batch` of plain Python work items.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from service.engine.cache_manager import CacheManager
from service.engine.sequence import Sequence, Status


class QueueFullError(RuntimeError):
    """The waiting queue is at MAX_QUEUE; the client should retry later (HTTP 429)."""


@dataclass(frozen=True)
class PrefillItem:
    seq: Sequence
    start: int  # first prompt position of the chunk
    end: int  # one past the last

    @property
    def completes_prompt(self) -> bool:
        return self.end == self.seq.num_prompt


@dataclass(frozen=True)
class Batch:
    """One engine step: either prompt chunks (prefill) or one new token for each running sequence (decode)."""

    prefill: list[PrefillItem]
    decode: list[Sequence]

    @property
    def is_prefill(self) -> bool:
        return bool(self.prefill)

    @property
    def size(self) -> int:
        return len(self.prefill) or len(self.decode)


class Scheduler:
    def __init__(self, cache: CacheManager, max_queue: int, prefill_chunk: int) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.cache = cache
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # `add` is called from the HTTP thread, everything else from the engine thread.
        self._lock = threading.Lock()
        self._last_was_prefill = False
        self.admit_paused = False  # set while a model swap waits for running sequences to drain

    def add(self, seq: Sequence) -> None:
        with self._lock:
            # Requests that a free slot will take at the next step do not count as queued.
            queued = len(self.waiting) - self.cache.num_free
            if queued >= self.max_queue:
                raise QueueFullError(f"{max(queued, 0)} requests already waiting (MAX_QUEUE={self.max_queue})")
            self.waiting.append(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running) or (bool(self.waiting) and not self.admit_paused)

    def drop_waiting(self, finished: list[Sequence]) -> None:
        """Take cancelled or expired sequences out of the waiting queue (they never got a slot)."""
        with self._lock:
            keep = deque(s for s in self.waiting if s.status is Status.WAITING and s not in finished)
            self.waiting = keep

    def remove_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq.slot)
        seq.slot = -1

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free cache slots (first come, first served)."""
        admitted = []
        if self.admit_paused:
            return admitted
        with self._lock:
            while self.waiting and self.cache.num_free > 0:
                seq = self.waiting.popleft()
                seq.slot = self.cache.allocate()
                seq.status = Status.RUNNING
                self.running.append(seq)
                admitted.append(seq)
        return admitted

    def schedule(self) -> Batch | None:
        """The next step's work, or None when nothing is running.

        Prompt chunks and decode steps alternate when both are pending, so a long prompt (cut into chunks of
        at most `prefill_chunk` tokens) delays running streams by one chunk at a time, never by the whole
        prompt.
        """
        pending = [s for s in self.running if not s.prefilled]
        ready = [s for s in self.running if s.prefilled]
        if pending and not (ready and self._last_was_prefill):
            self._last_was_prefill = True
            return Batch(prefill=self._prefill_items(pending), decode=[])
        self._last_was_prefill = False
        if not ready:
            return None
        # Slot order keeps the batch contiguous in the cache when possible (a view instead of a gather).
        ready.sort(key=lambda s: s.slot)
        return Batch(prefill=[], decode=ready)

    def _prefill_items(self, pending: list[Sequence]) -> list[PrefillItem]:
        """Prompt chunks for one step, first come first served, at most `prefill_chunk` tokens in all.

        The runner packs the chunks back to back with no padding between them, so the cost is the token count;
        the last prompt that fits only in part is cut, and the rest of it comes in the next prefill step.
        """
        items: list[PrefillItem] = []
        budget = self.prefill_chunk
        for seq in pending:
            if budget == 0:
                break
            n = min(seq.num_prompt - seq.num_cached, budget)
            items.append(PrefillItem(seq, seq.num_cached, seq.num_cached + n))
            budget -= n
        return items
