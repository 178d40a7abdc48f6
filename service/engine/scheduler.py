"""Who runs next step, and what a step did to each sequence: waiting and running queues, admission while cache
slots are free, prefill chunks, and every state change of a sequence (a token appended, finished, its slot
released).

The scheduler never touches tensors or text; it hands the runner a `Batch` of plain Python work items and takes
back the sampled token ids (`postprocess`), as nano-vllm's does.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from model.sampling import TokenLogprobs
from service.engine.cache_manager import CacheManager, common_prefix
from service.engine.sequence import FinishReason, Sequence, Status

_Kind = Literal["prompt", "recompute", "decode"]

# A burst of waiting prompts is prefilled in about this many steps when `prefill_group` would take more: the median
# request waits for half the burst's tokens plus one step's fixed cost per group before it, so larger bursts want
# larger groups. Measured on the AVX2 EPYC (int4, 2 threads, 16-token prompts arriving together, 64 greedy tokens):
# 64 prompts had their median first token after 1.01 s in groups of 64 tokens and 0.83 s in groups of 128; 16 after
# 0.28 s in groups of 64 and 0.40 s all in one step.
BURST_STEPS = 8

# Prompts that begin with at least this many of the same tokens (a shared system prompt, the same request sent
# twice) compute them once: the others copy them from the first one's slot. Waiting a step for them is worth it
# from about this many: a step's fixed cost (reading every weight once) is a few prompt tokens' compute.
MIN_SHARED_PREFIX = 8


class QueueFullError(RuntimeError):
    """The waiting queue is at MAX_QUEUE; the client should retry later (HTTP 429)."""


@dataclass(frozen=True)
class PrefillItem:
    seq: Sequence
    start: int  # first prompt position of the chunk
    end: int  # one past the last
    # n > 1: not computed; positions start..end-1 are copied from this sequence's slot once its prompt is done.
    source: Sequence | None = None
    # Positions 0..start-1 are copied from this slot before the step computes start..end-1: a running sequence's
    # or a free one's, whose tokens begin as this prompt does.
    prefix_slot: int | None = None

    @property
    def completes_prompt(self) -> bool:
        """The chunk ends what the sequence must prefill (its prompt, or prompt + output after a recompute)."""
        return self.end == self.seq.prefill_len


@dataclass(frozen=True)
class Batch:
    """One engine step: prompt chunks (prefill), one new token for each running sequence (decode), or, when the
    runner computes both in one pass (`Scheduler.mixed`), the two together."""

    prefill: list[PrefillItem]
    decode: list[Sequence]

    @property
    def is_prefill(self) -> bool:
        return bool(self.prefill)

    @property
    def size(self) -> int:
        return len(self.prefill) + len(self.decode)


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
    prefix_query_tokens: int = 0  # prompt tokens of the sequences admitted this step
    # Positions not computed: reused from a free slot's previous owner (at admission) or copied from a running
    # sequence's slot (when prefilled).
    prefix_hit_tokens: int = 0


class Scheduler:
    def __init__(
        self,
        cache: CacheManager,
        max_queue: int,
        prefill_chunk: int,
        recompute_chunk: int | None = None,
        prefill_group: int | None = None,
        max_decode_stall: float = 0.0,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if recompute_chunk is not None and recompute_chunk < 1:
            raise ValueError(f"recompute_chunk must be >= 1, got {recompute_chunk}")
        if prefill_group is not None and prefill_group < 1:
            raise ValueError(f"prefill_group must be >= 1, got {prefill_group}")
        if not max_decode_stall >= 0:
            raise ValueError(f"max_decode_stall must be >= 0, got {max_decode_stall}")
        self.cache = cache
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        # Prompt tokens a step holds at most, its first prompt aside (default: prefill_chunk; more when a burst of
        # prompts waits, see BURST_STEPS): further prompts join it only whole and within this. Prefill is
        # compute-bound, so a burst of requests prefilled a few at a time gets most first tokens sooner than one step
        # holding them all, at the cost of one step's fixed overhead per group; the first prompt of a step is cut at
        # prefill_chunk only, so a long prompt alone takes no more steps.
        self.prefill_group = min(prefill_group or prefill_chunk, prefill_chunk)
        # Seconds a running stream may wait for its next token while a burst of new prompts (at least as many as
        # the running streams) is prefilled ahead of it. Prefill is compute-bound: a burst's prompts computed group
        # after group, with nothing else in their steps, give the median request its first token soonest (a decode
        # row would cost as much as a prompt token there); past this wait the running streams are decoded again. A
        # prompt or two arriving while many streams run is not a burst: holding the streams back for it would cost
        # each of them a step for one request's first token. 0: streams are decoded at least every other step.
        self.max_decode_stall = max_decode_stall
        # Tokens one step may recompute for the sequences a model swap moved (default: prefill_chunk). Smaller than
        # a prompt chunk: a request arriving during the recompute waits for the step in progress, so that step's
        # length is what the reload adds to its first token.
        self.recompute_chunk = recompute_chunk or prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # `add` is called from the HTTP thread, everything else from the engine thread.
        self._lock = threading.Lock()
        self._last: _Kind | None = None  # what the previous step did
        self._recompute_owed = False  # the last prefill step took new prompts while a recompute waited
        self.admit_paused = False  # set while a model swap waits for running sequences to drain
        # Set by the engine when its runner computes decode rows and prompt chunks in one pass at no extra cost
        # (the native int4 kernels treat every token as an independent row): a step that decodes the ready
        # sequences then also prefills the next prompt chunks, instead of alternating the two kinds of step. Only
        # then are prompts grouped (`prefill_group`): such a step's fixed cost is small next to a prompt token's. On
        # the PyTorch path (~60 tensor ops a layer per step) a burst of 16 prompts got its median first token no
        # sooner in groups of 64 tokens (791 against 755 ms, fp32 on the AVX2 EPYC) and 12% fewer tokens a second.
        self.mixed = False

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

    def add_group(self, seqs: list[Sequence]) -> None:
        """Queue sequences sharing one prompt (n > 1): admitted together when len(seqs) slots are free, the prompt
        prefilled once for the first and its KV copied to the others."""
        if len(seqs) > self.cache.max_slots:
            raise ValueError(f"n: {len(seqs)} choices need as many cache slots; this server has {self.cache.max_slots}")
        lead, rest = seqs[0], seqs[1:]
        if any(s.prompt_ids != lead.prompt_ids for s in rest):
            raise ValueError("submit_group: the sequences of a group must share one prompt")
        lead.siblings = list(rest)
        for s in rest:
            s.share_from = lead
        with self._lock:
            queued = len(self.waiting) - self.cache.num_free
            if queued + len(seqs) - 1 >= self.max_queue:
                raise QueueFullError(f"{max(queued, 0)} requests already waiting (MAX_QUEUE={self.max_queue})")
            self.waiting.extend(seqs)

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
            while self.waiting:
                seq = self.waiting[0]
                # A group is admitted whole or not at all: half of it would wait for slots its other half holds.
                group = [seq, *(s for s in seq.siblings if s.status is Status.WAITING)]
                if self.cache.num_free < len(group):
                    break
                for s in group:
                    self.waiting.remove(s)
                    if s.share_from is None:
                        # A prompt to be scored (prompt_logprobs) needs the logits of every position: no reuse.
                        s.slot, hit = self.cache.allocate_for(s.prompt_ids if s.prompt_logprobs is None else [])
                        # At least one prompt token is computed: its logits give the first output token.
                        s.prefix_hit = min(hit, s.num_prompt - 1)
                        s.num_cached = s.prefix_hit
                        self.cache.set_tokens(s.slot, s.num_cached)
                        if stats is not None:
                            stats.prefix_query_tokens += s.num_prompt
                            stats.prefix_hit_tokens += s.prefix_hit
                    else:
                        s.slot = self.cache.allocate()
                    s.status = Status.RUNNING
                    s.admitted_time = now
                    self.running.append(s)
                    admitted.append(s)
        if stats is not None:
            stats.queue_waits.extend(now - s.arrival_time for s in admitted)
        return admitted

    def schedule(self, now: float | None = None) -> Batch | None:
        """The next step's work at time `now` (None: as if every running stream waited too long), or None when
        nothing is running.

        Three kinds of work: prompt chunks of new requests (at most `prefill_chunk` tokens, further prompts whole and
        within `prefill_chunk`, or with `mixed` within `prefill_group`), the recompute of sequences a model swap
        moved (prompt + output so far, at most `recompute_chunk` tokens), and one decode step of every sequence
        that is ready. A step takes chunks of one kind only. New prompts go before the recompute (a new request's
        first token does not wait for the moved streams' history), except right after a prompt step, so that a
        steady arrival of requests cannot starve the moved streams.

        While at least as many new prompts wait as sequences are ready (a burst), the ready ones wait while the
        prompts are prefilled, until one of them has waited `max_decode_stall` seconds for its next token; with
        fewer (a steady arrival of requests) they are not held back. When they are not, with `mixed` the step also
        decodes every ready sequence (as every recompute step does); otherwise a step is prefill or decode, and a
        prefill step does not follow a step of its own kind: a long prompt or a long recompute then delays running
        streams by one chunk at a time.
        """
        for s in self.running:
            if s.share_from is not None and s.share_from.finished and not s.share_from.prefilled:
                s.share_from = None  # its lead ended before prefilling the prompt: prefill it itself
        pending: dict[_Kind, list[Sequence]] = {"prompt": [], "recompute": []}
        ready = []
        for s in self.running:
            if s.prefilled:
                ready.append(s)
            elif s.share_from is None:
                # A sequence with output is one a swap moved; one moved before its first token is a new prompt.
                pending["recompute" if s.output_ids else "prompt"].append(s)
        # Slot order keeps a decode batch contiguous in the cache when possible (a view instead of a gather).
        ready.sort(key=lambda s: s.slot)
        order: tuple[_Kind, _Kind] = ("recompute", "prompt") if self._recompute_owed else ("prompt", "recompute")
        for kind in order:
            if not pending[kind]:
                continue
            if kind == "prompt" and ready and len(pending["prompt"]) >= len(ready) and not self._stalled(ready, now):
                decode: list[Sequence] = []  # a burst's prompts first: the running streams have not waited too long
            elif self.mixed or not ready:
                decode = ready
            # A prompt chunk may follow anything but a prompt chunk (a new request need not wait for a decode step
            # after a recompute step), a recompute chunk only a decode step.
            elif self._last != "prompt" if kind == "prompt" else self._last == "decode":
                decode = []
            else:
                continue
            self._last = kind
            self._recompute_owed = kind == "prompt" and bool(pending["recompute"])
            if kind == "prompt":
                waiting_tokens = sum(s.prefill_len - s.num_cached for s in pending[kind])
                group = max(self.prefill_group, -(-waiting_tokens // BURST_STEPS)) if self.mixed else self.prefill_chunk
                group = min(group, self.prefill_chunk)
                items = self._prefill_items(pending[kind], self.prefill_chunk, group)
            else:
                items = self._prefill_items(pending[kind], self.recompute_chunk)
            return Batch(prefill=items, decode=decode)
        if not ready:
            return None
        self._last = "decode"
        return Batch(prefill=[], decode=ready)

    def _stalled(self, ready: list[Sequence], now: float | None) -> bool:
        """Some ready sequence has waited `max_decode_stall` seconds for its next token (always, without `now`)."""
        return now is None or any(
            s.last_token_time is not None and now - s.last_token_time >= self.max_decode_stall for s in ready
        )

    def _prefill_items(self, pending: list[Sequence], chunk: int, group: int | None = None) -> list[PrefillItem]:
        """Chunks for one step, packed back to back by the runner (no padding between them, so the cost is the
        token count). The first, the longest waiting, is at most `chunk` tokens. With `group` (new prompts), each
        next one is a whole prompt that keeps the step within `group` tokens, taken first come first served among
        those that fit: a prompt cut in two would get its first token a step later, and its remainder would make a
        step of its own. Without (a recompute), the next ones fill the step up to `chunk`, the last cut where it
        ends.

        New prompts share computed positions: a prompt that begins as a running sequence's does, or as what a free
        slot holds (at least MIN_SHARED_PREFIX tokens), gets those positions copied from that slot and computes
        the rest, and one that begins as a prompt of this step does waits a step for it. (A free slot matters here
        too: a prompt waiting for a request that then ended at its first token copies from the slot it left.)
        """
        items: list[PrefillItem] = []
        used = 0
        prefixes = _Prefixes(self.running, self.cache.held) if group is not None else None
        for seq in pending:
            start, donor = seq.num_cached, None
            if prefixes is not None and seq.prompt_logprobs is None:  # a scored prompt computes every position
                donor, shared, planned = prefixes.longest(seq)
                if planned >= max(shared, start) + MIN_SHARED_PREFIX:
                    continue  # a prompt of this step computes more of it: copy from that one next step
                if shared > start:
                    start = shared
                else:
                    donor = None
            remaining = seq.prefill_len - start
            if not items:
                n = min(remaining, chunk)
            elif group is not None:
                if used + remaining > group:
                    continue
                n = remaining
            else:
                n = min(remaining, chunk - used)
            if n <= 0:
                break
            item = PrefillItem(seq, start, start + n, prefix_slot=donor)
            items.append(item)
            used += n
            if prefixes is not None:
                prefixes.plan(item)
            if item.completes_prompt:
                # Siblings waiting for this prompt get its KV copied, at no prefill cost.
                items += [
                    PrefillItem(s, 0, item.end, source=seq)
                    for s in seq.siblings
                    if s.share_from is seq and not s.finished
                ]
        return items

    # ---- state transitions after a step ----

    def postprocess(
        self,
        batch: Batch,
        tokens: list[int | None],
        now: float,
        stats: StepStats | None = None,
        logprobs: list[TokenLogprobs | None] | None = None,
    ) -> list[Sequence]:
        """Apply a step's sampled tokens (one per batch row: the prefill items, then the decode sequences):
        record prompt progress, append each token, and finish the sequences that sampled a stop id or reached
        max_tokens or the context (releasing their slots). Returns the sequences that got a token, in batch
        order; `seq.finished` says which of them ended."""
        stats = stats if stats is not None else StepStats()
        stats.batch_size = batch.size
        stats.is_prefill = batch.is_prefill
        appended: list[Sequence] = []
        if len(tokens) != batch.size:
            raise ValueError(f"{len(tokens)} tokens for a batch of {batch.size}")
        lps = logprobs if logprobs is not None else [None] * len(tokens)
        n = len(batch.prefill)
        for item, tok, lp in zip(batch.prefill, tokens[:n], lps[:n], strict=True):
            seq = item.seq
            if item.prefix_slot is not None:
                stats.prefix_hit_tokens += item.start - seq.num_cached
                seq.prefix_hit = item.start
            seq.num_cached = item.end
            if item.source is None:
                stats.prompt_tokens += item.end - item.start
            else:
                seq.share_from = None  # it holds the prompt now (a later recompute prefills it itself)
            self.cache.set_tokens(seq.slot, seq.num_cached)
            if tok is not None:
                self._append(seq, tok, now, stats, lp)
                appended.append(seq)
        for seq, tok, lp in zip(batch.decode, tokens[n:], lps[n:], strict=True):
            assert tok is not None  # every decode row samples
            self._append(seq, tok, now, stats, lp)
            appended.append(seq)
        return appended

    def _append(self, seq: Sequence, tok: int, now: float, stats: StepStats, lp: TokenLogprobs | None) -> None:
        seq.output_ids.append(tok)
        seq.last_logprobs = lp
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
            return
        if seq.structured is not None:
            if not seq.structured.accept(tok):  # only if the token was not sampled under the grammar's mask
                self.finish(seq, FinishReason.ERROR, now, stats, error=f"structured output: {seq.structured.error}")
                return
            if seq.structured.is_finished:  # nothing but the end can follow
                self.finish(seq, FinishReason.STOP, now, stats)
                return
        if len(seq.output_ids) >= seq.max_tokens or seq.total_len >= self.context:
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
            # The slot keeps what this sequence wrote, for a later prompt that starts the same way; not after an
            # error, when a failed step may have left it half written.
            self.cache.free(seq.slot, None if reason is FinishReason.ERROR else _written(seq))
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


def _written(seq: Sequence) -> list[int]:
    """Token ids whose KV the sequence's slot holds at positions 0..: the prefilled part, and once decoding, every
    token but the last sampled one (which never went through the model)."""
    return seq.prefill_ids(0, _num_written(seq))


def _num_written(seq: Sequence) -> int:
    if seq.share_from is not None:
        return 0  # a sibling whose copy never happened
    return seq.num_cached if not seq.prefilled else max(seq.total_len - 1, seq.num_cached)


class _Prefixes:
    """The computed positions of the running sequences' slots and of the free slots (what their last owners left),
    and those this step's prefill items will compute, each kept sorted by its tokens: the longest common beginning
    of a prompt with any of them is with one of its two neighbours in that order, so every waiting prompt is looked
    up each step without comparing all pairs."""

    def __init__(self, running: list[Sequence], held: Mapping[int, list[int]]) -> None:
        # (tokens at positions 0.. that hold KV, their slot); `_planned`: only once this step has run
        done = [(d.prefill_ids(0, n), d.slot) for d in running if (n := _num_written(d)) >= MIN_SHARED_PREFIX]
        done += [(tokens, slot) for slot, tokens in held.items() if len(tokens) >= MIN_SHARED_PREFIX]
        self._done = sorted(done, key=_tokens)
        self._planned: list[tuple[list[int], int]] = []

    def plan(self, item: PrefillItem) -> None:
        if item.end >= MIN_SHARED_PREFIX:
            bisect.insort(self._planned, (item.seq.prefill_ids(0, item.end), item.seq.slot), key=_tokens)

    def longest(self, seq: Sequence) -> tuple[int | None, int, int]:
        """(slot, shared, planned): the other slot holding the longest beginning of `seq`'s prompt and that
        beginning's length, and the longest one a prefill item of this step computes; both at most all but the
        prompt's last token (whose logits give the first output token), 0 when under MIN_SHARED_PREFIX."""
        limit = seq.num_prompt - 1
        if limit < MIN_SHARED_PREFIX:
            return None, 0, 0
        donor, shared = _nearest(self._done, seq)
        planned = min(_nearest(self._planned, seq)[1], limit)
        shared = min(shared, limit)
        if shared < MIN_SHARED_PREFIX:
            donor, shared = None, 0
        return donor, shared, planned if planned >= MIN_SHARED_PREFIX else 0


def _tokens(entry: tuple[list[int], int]) -> list[int]:
    return entry[0]


def _nearest(entries: list[tuple[list[int], int]], seq: Sequence) -> tuple[int | None, int]:
    """The entry (other than `seq`'s own slot) sharing the longest beginning with `seq`'s prompt: its slot and the
    length."""
    best: int | None = None
    shared = 0
    i = bisect.bisect_left(entries, seq.prompt_ids, key=_tokens)
    for side in (range(i - 1, -1, -1), range(i, len(entries))):
        for j in side:
            tokens, slot = entries[j]
            if slot == seq.slot:
                continue
            n = common_prefix(tokens, seq.prompt_ids)
            if n > shared:
                best, shared = slot, n
            break
    return best, shared


def _should_end(seq: Sequence, now: float) -> FinishReason | None:
    if seq.cancelled:
        return FinishReason.CANCELLED
    deadline = seq.deadline
    if deadline is not None and now > deadline:
        # Before the first token the request failed (the HTTP layer turns TIMEOUT into an error); after it, the
        # client has part of an answer, cut short: ABORT, as vLLM names it.
        return FinishReason.ABORT if seq.output_ids else FinishReason.TIMEOUT
    return None
