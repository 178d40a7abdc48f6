"""The engine loop: schedule -> run -> postprocess, in a dedicated thread (torch releases the GIL), handing
events to asyncio once per step.

Everything that touches the scheduler's running queue, the cache manager or the model runs on this thread;
the HTTP side only submits sequences and sets their `cancelled` flag.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from model.llama import Transformer
from model.tokenizer import IncrementalDecoder
from service.engine.cache_manager import CacheManager, CacheUsage
from service.engine.runner import ModelRunner
from service.engine.scheduler import Batch, QueueFullError, Scheduler
from service.engine.sequence import FinishReason, Sequence, Status, StreamEvent

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineStats", "ModelInfo", "QueueFullError", "StepStats"]


@dataclass(frozen=True)
class ModelInfo:
    checkpoint: str
    step: str = ""
    name: str = "smollm"


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


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for gauges."""

    running: int
    waiting: int
    cache: CacheUsage


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer,
        *,
        max_batch_size: int,
        max_context: int,
        max_queue: int,
        prefill_chunk: int,
        info: ModelInfo,
    ) -> None:
        self.runner = ModelRunner(model, max_batch_size, max_context)
        self.tokenizer = tokenizer
        self.info = info
        self.model_version = 0
        self.cache_manager = CacheManager(max_batch_size, self.runner.context)
        self.scheduler = Scheduler(self.cache_manager, max_queue, prefill_chunk)
        self.stop_ids = self._stop_ids(model, tokenizer)
        self.on_step: list[Callable[[StepStats], None]] = []
        self.on_swap: list[Callable[[ModelInfo], None]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pending_swap: tuple[Transformer, object, ModelInfo] | None = None
        self._abort_reason: str | None = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self.steps = 0

    # ---- public interface (any thread) ----

    @property
    def max_context(self) -> int:
        """Tokens one sequence may hold, prompt included (MAX_CONTEXT capped by the model's block size)."""
        return self.runner.context

    @property
    def vocab_size(self) -> int:
        return self.runner.model.config.vocab_size

    def start(self, aio_loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the loop thread; events are delivered on `aio_loop` (or on the engine thread when None)."""
        self._aio_loop = aio_loop
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="smollm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; raises QueueFullError when MAX_QUEUE requests already wait."""
        if not seq.stop_ids and not seq.ignore_eos:
            seq.stop_ids = self.stop_ids
        self.scheduler.add(seq)
        self.wake()

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        self.wake()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def abort_all(self, reason: str) -> None:
        """End every running and waiting sequence with an error event carrying `reason` (streams get their
        `error` event, non-streaming requests a 503). Runs on the engine thread at its next step; when the
        loop is not running, here and now. Returns at once: use `wait_idle` to wait for it."""
        with self._cond:
            self._abort_reason = reason
            self._cond.notify_all()
        if not self.alive:
            self._take_abort()

    def _take_abort(self) -> None:
        with self._cond:
            reason, self._abort_reason = self._abort_reason, None
        if reason is not None:
            self._fail_running(reason, waiting=True)

    def swap_model(self, model: Transformer, tokenizer, info: ModelInfo) -> None:
        """Serve `model` once the running sequences have finished on the old one; new requests wait meanwhile."""
        with self._cond:
            self._pending_swap = (model, tokenizer, info)
            self.scheduler.admit_paused = True
            self._cond.notify_all()

    @property
    def swap_pending(self) -> bool:
        return self._pending_swap is not None

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=self.scheduler.num_waiting,
            cache=self.cache_manager.usage(),
        )

    def idle(self) -> bool:
        return not self.scheduler.running and not self.scheduler.waiting

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing runs or waits (True), or until `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    # ---- the loop (engine thread) ----

    @staticmethod
    def _stop_ids(model: Transformer, tokenizer) -> frozenset[int]:
        ids = {model.config.eos_token_id}
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.add(tokenizer.eos_token_id)
        return frozenset(i for i in ids if i is not None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._has_work():
                    # Wake up now and then to expire waiting requests whose deadline passed.
                    self._cond.wait(timeout=0.5)
                    if self.scheduler.waiting:
                        break
                if self._stopping:
                    break
            try:
                self._take_abort()
                self.step()
            except Exception as e:  # the engine must outlive a failed step; the affected requests get an error
                log.exception("engine step failed")
                self._fail_running(f"engine error: {type(e).__name__}: {e}")

    def _has_work(self) -> bool:
        if self._abort_reason is not None:
            return True
        return self.scheduler.has_work() or (self._pending_swap is not None and not self.scheduler.running)

    def step(self) -> StepStats:
        """One engine step: expire/cancel, maybe swap the model, admit, run one batch, postprocess."""
        now = time.monotonic()
        stats = StepStats()
        events: list[tuple[Sequence, StreamEvent]] = []
        self._expire(now, stats, events)
        if self._pending_swap is not None and not self.scheduler.running:
            self._apply_swap()
        for seq in self.scheduler.admit():
            seq.admitted_time = now
            seq.model_version = self.model_version
            seq.decoder = IncrementalDecoder(self.tokenizer)
            stats.queue_waits.append(now - seq.arrival_time)
        batch = self.scheduler.schedule()
        if batch is not None:
            tokens = self.runner.run(batch)
            self._postprocess(batch, tokens, time.monotonic(), stats, events)
        self.steps += 1
        for cb in self.on_step:  # before delivery: a client that got its answer sees it in the metrics
            cb(stats)
        self._deliver(events)
        return stats

    def _expire(self, now: float, stats: StepStats, events: list) -> None:
        for seq in list(self.scheduler.running):
            reason = self._should_end(seq, now)
            if reason is not None:
                self._finish(seq, reason, now, stats, events)
        if self.scheduler.waiting:
            gone = []
            for seq in list(self.scheduler.waiting):
                reason = self._should_end(seq, now)
                error = None
                if reason is None and seq.num_prompt >= self.runner.context:
                    # Only after a reload to a model with a shorter context: the prompt no longer fits.
                    reason, error = FinishReason.ERROR, f"prompt ({seq.num_prompt} tokens) exceeds the new context"
                if reason is not None:
                    gone.append(seq)
                    self._finish(seq, reason, now, stats, events, error=error)
            if gone:
                self.scheduler.drop_waiting(gone)

    @staticmethod
    def _should_end(seq: Sequence, now: float) -> FinishReason | None:
        if seq.cancelled:
            return FinishReason.CANCELLED
        deadline = seq.deadline
        if deadline is not None and now > deadline:
            return FinishReason.TIMEOUT
        return None

    def _postprocess(self, batch: Batch, tokens: list[int | None], now: float, stats: StepStats, events) -> None:
        stats.batch_size = batch.size
        stats.is_prefill = batch.is_prefill
        if batch.is_prefill:
            for item, tok in zip(batch.prefill, tokens, strict=True):
                seq = item.seq
                seq.num_cached = item.end
                stats.prompt_tokens += item.end - item.start
                self.cache_manager.set_tokens(seq.slot, seq.num_cached)
                if tok is not None:
                    self._append(seq, tok, now, stats, events)
        else:
            for seq, tok in zip(batch.decode, tokens, strict=True):
                self._append(seq, tok, now, stats, events)

    def _append(self, seq: Sequence, tok: int, now: float, stats: StepStats, events) -> None:
        seq.output_ids.append(tok)
        stats.generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            stats.ttfts.append(now - seq.arrival_time)
        else:
            stats.inter_token.append(now - seq.last_token_time)
        seq.last_token_time = now
        self.cache_manager.set_tokens(seq.slot, seq.total_len)
        # Exactly one token event per generated token, even when its text is empty (an end-of-sequence token,
        # part of a UTF-8 character, text held back as a possible stop-string prefix), so that a client's count
        # of events equals usage.completion_tokens. Text flushed at the end rides on the last token's event.
        reason = None
        if tok in seq.stop_ids:
            text, reason = "", FinishReason.STOP
        else:
            text, hit = seq.append_text(seq.decoder.step(tok))
            if hit:
                reason = FinishReason.STOP
            elif len(seq.output_ids) >= seq.max_tokens or seq.total_len >= self.runner.context:
                reason = FinishReason.LENGTH
        if reason is not None:
            text += seq.flush_text()
        events.append((seq, StreamEvent(text=text, index=len(seq.output_ids) - 1)))
        if reason is not None:
            self._finish(seq, reason, now, stats, events)

    def _finish(self, seq: Sequence, reason: FinishReason, now: float, stats: StepStats, events, error=None) -> None:
        if seq.status is Status.RUNNING:
            self.scheduler.remove_running(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.finished_time = now
        events.append((seq, StreamEvent(finish_reason=reason, index=len(seq.output_ids), error=error)))
        stats.finished.append(seq)

    def _fail_running(self, message: str, waiting: bool = False) -> None:
        """End every running sequence (and with `waiting`, every queued one) with an error event."""
        now = time.monotonic()
        stats, events = StepStats(), []
        for seq in list(self.scheduler.running):
            self._finish(seq, FinishReason.ERROR, now, stats, events, error=message)
        if waiting and self.scheduler.waiting:
            gone = [s for s in list(self.scheduler.waiting) if s.status is Status.WAITING]
            for seq in gone:
                self._finish(seq, FinishReason.ERROR, now, stats, events, error=message)
            self.scheduler.drop_waiting(gone)
        for cb in self.on_step:
            cb(stats)
        self._deliver(events)

    def _deliver(self, events: list[tuple[Sequence, StreamEvent]]) -> None:
        if not events:
            return
        if self._aio_loop is None:
            _dispatch(events)
            return
        try:
            # One cross-thread hand-off per step, whatever the batch size.
            self._aio_loop.call_soon_threadsafe(_dispatch, events)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            log.debug("event loop closed; dropping %d events", len(events))

    def _apply_swap(self) -> None:
        with self._cond:
            model, tokenizer, info = self._pending_swap
            self._pending_swap = None
        old_context = self.runner.context
        self.runner.set_model(model)
        if self.runner.context != old_context:
            self.cache_manager = CacheManager(self.cache_manager.max_slots, self.runner.context)
            self.scheduler.cache = self.cache_manager
        self.tokenizer = tokenizer
        self.stop_ids = self._stop_ids(model, tokenizer)
        self.info = info
        self.model_version += 1
        self.scheduler.admit_paused = False
        log.info("now serving %s (step %s)", info.checkpoint, info.step or "-")
        for cb in self.on_swap:
            cb(info)


def _dispatch(events: list[tuple[Sequence, StreamEvent]]) -> None:
    for seq, event in events:
        if seq.emit is not None:
            seq.emit(seq, event)
