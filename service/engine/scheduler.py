"""Who runs next step, and what a step did to each sequence: waiting and running queues, admission while cache
slots are free, prefill chunks, and every state change of a sequence (a token appended, finished, its slot
released).

The scheduler never touches tensors or text; it hands the runner a `Batch` of plain Python work items and takes
back the sampled token ids (`postprocess`), as nano-vllm's does.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from service.engine.cache_manager import CacheManager
from service.engine.sequence import FinishReason, Sequence, Status


class QueueFullError(RuntimeError):
    """The waiting queue is at MAX_QUEUE; the client should retry later (HTTP 429)."""


@dataclass(frozen=True)
class PrefillItem:
    seq: Sequence
    start: int  # first prompt position of the chunk
    end: int  # one past the last

    @property
    def completes_prompt(self) -> bool:
        """The chunk ends what the sequence must prefill (its prompt, or prompt + output after a recompute)."""
        return self.end == self.seq.prefill_len


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


@dataclass
class StepStats:
    """What one engine step did; metrics.py turns it into Prometheus observations."""

    batch_size: int = 0
    is_prefill: bool = False
    prompt_tokens: int = 0
    generation_tokens: int = 0
    queue_waits: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    inter_token: list[float] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)


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

    @property
    def context(self) -> int:
        """Tokens one sequence may hold, prompt included."""
        return self.cache.max_len

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

    def admit(self, now: float, stats: StepStats | None = None) -> list[Sequence]:
        """Move waiting sequences into free cache slots (first come, first served)."""
        admitted: list[Sequence] = []
        if self.admit_paused:
            return admitted
        with self._lock:
            while self.waiting and self.cache.num_free > 0:
                seq = self.waiting.popleft()
                seq.slot = self.cache.allocate()
                seq.status = Status.RUNNING
                seq.admitted_time = now
                self.running.append(seq)
                admitted.append(seq)
        if stats is not None:
            stats.queue_waits.extend(now - s.arrival_time for s in admitted)
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
            n = min(seq.prefill_len - seq.num_cached, budget)
            items.append(PrefillItem(seq, seq.num_cached, seq.num_cached + n))
            budget -= n
        return items

    # ---- state transitions after a step ----

    def postprocess(
        self, batch: Batch, tokens: list[int | None], now: float, stats: StepStats | None = None
    ) -> list[Sequence]:
        """Apply a step's sampled tokens: record prompt progress, append each token, and finish the sequences
        that sampled a stop id or reached max_tokens or the context (releasing their slots). Returns the
        sequences that got a token, in batch order; `seq.finished` says which of them ended."""
        stats = stats if stats is not None else StepStats()
        stats.batch_size = batch.size
        stats.is_prefill = batch.is_prefill
        appended: list[Sequence] = []
        if batch.is_prefill:
            for item, tok in zip(batch.prefill, tokens, strict=True):
                seq = item.seq
                seq.num_cached = item.end
                stats.prompt_tokens += item.end - item.start
                self.cache.set_tokens(seq.slot, seq.num_cached)
                if tok is not None:
                    self._append(seq, tok, now, stats)
                    appended.append(seq)
        else:
            for seq, tok in zip(batch.decode, tokens, strict=True):
                assert tok is not None  # every decode row samples
                self._append(seq, tok, now, stats)
                appended.append(seq)
        return appended

    def _append(self, seq: Sequence, tok: int, now: float, stats: StepStats) -> None:
        seq.output_ids.append(tok)
        stats.generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            stats.ttfts.append(now - seq.arrival_time)
        else:
            stats.inter_token.append(now - (seq.last_token_time or now))
        seq.last_token_time = now
        self.cache.set_tokens(seq.slot, seq.total_len)
        if tok in seq.stop_ids:
            self.finish(seq, FinishReason.STOP, now, stats)
        elif len(seq.output_ids) >= seq.max_tokens or seq.total_len >= self.context:
            self.finish(seq, FinishReason.LENGTH, now, stats)

    def finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        now: float,
        stats: StepStats | None = None,
        error: str | None = None,
    ) -> None:
        """End `seq`: out of the running queue (its slot released) or the waiting queue. Finishing it again in
        the same step only changes the reason (a stop string found in the token that also reached the length)."""
        if seq.status is Status.FINISHED:
            seq.finish_reason = reason
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.cache.free(seq.slot)
            seq.slot = -1
        elif seq.status is Status.WAITING:
            self.drop_waiting([seq])
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.finished_time = now
        seq.error = error
        if stats is not None:
            stats.finished.append(seq)

    def expire(self, now: float, stats: StepStats | None = None) -> list[Sequence]:
        """Finish cancelled sequences, those past their deadline, and waiting prompts that no longer fit the
        context (after a reload to a model with a shorter one). Returns them."""
        ended: list[Sequence] = []
        for seq in list(self.running):
            reason = _should_end(seq, now)
            if reason is not None:
                self.finish(seq, reason, now, stats)
                ended.append(seq)
        if self.waiting:
            for seq in list(self.waiting):
                reason, error = _should_end(seq, now), None
                if reason is None and seq.num_prompt >= self.context:
                    reason, error = FinishReason.ERROR, f"prompt ({seq.num_prompt} tokens) exceeds the new context"
                if reason is not None:
                    self.finish(seq, reason, now, stats, error=error)
                    ended.append(seq)
        return ended

    def fail(self, seqs: Iterable[Sequence], error: str, now: float, stats: StepStats | None = None) -> list[Sequence]:
        """Finish each of `seqs` not yet finished with an error; returns those it finished."""
        failed = []
        for seq in list(seqs):
            if not seq.finished:
                self.finish(seq, FinishReason.ERROR, now, stats, error=error)
                failed.append(seq)
        return failed

    def drop_waiting(self, finished: list[Sequence]) -> None:
        """Take sequences out of the waiting queue (they never got a slot)."""
        gone = {id(s) for s in finished}
        with self._lock:
            self.waiting = deque(s for s in self.waiting if id(s) not in gone)


def _should_end(seq: Sequence, now: float) -> FinishReason | None:
    if seq.cancelled:
        return FinishReason.CANCELLED
    deadline = seq.deadline
    if deadline is not None and now > deadline:
        # Before the first token the request failed (the HTTP layer turns TIMEOUT into an error); after it, the
        # client has part of an answer, cut short: ABORT, as vLLM names it.
        return FinishReason.ABORT if seq.output_ids else FinishReason.TIMEOUT
    return None
