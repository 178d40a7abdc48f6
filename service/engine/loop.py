"""The engine loop: schedule -> run -> postprocess, in a dedicated thread (torch releases the GIL), handing
events to asyncio once per step.

The scheduler decides and records every state change of a sequence; this module adds the thread, the text
(detokenisation and stop strings), event delivery, model swaps and the engine's health. Everything that touches
the scheduler's running queue, the cache manager or the model runs on this thread; the HTTP side only submits
sequences and sets their `cancelled` flag.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from model.llama import Transformer
from model.sampling import TokenHistory
from model.tokenizer import IncrementalDecoder
from service.engine.cache_manager import CacheManager, CacheUsage
from service.engine.runner import ModelRunner
from service.engine.scheduler import QueueFullError, Scheduler, StepStats
from service.engine.sequence import FinishReason, Sequence, StreamEvent

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineDeadError", "EngineStats", "ModelInfo", "QueueFullError", "StepStats", "Tokenizer"]


class Tokenizer(Protocol):
    """What the engine needs of a tokenizer (a transformers fast tokenizer fits): the end-of-sequence id, and
    the backend that model.tokenizer.IncrementalDecoder streams text from."""

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def backend_tokenizer(self) -> Any: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Any, skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class ModelInfo:
    checkpoint: str
    step: str = ""
    name: str = "smollm"


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for gauges."""

    running: int
    waiting: int
    cache: CacheUsage


class EngineDeadError(RuntimeError):
    """The engine thread is not running (it died, or the server is stopping): nothing queued would ever be served.
    The HTTP layer answers 503."""


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int,
        max_context: int,
        max_queue: int,
        prefill_chunk: int,
        info: ModelInfo,
        backstop_timeout: float = 3600.0,
        stall_timeout: float = 60.0,
        drain_timeout: float = 2.0,
        recompute_chunk: int = 64,
        prefill_group: int | None = None,
        max_decode_stall: float = 0.0,
        compile: str = "off",
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.runner = ModelRunner(model, max_batch_size, max_context, compile=compile, kv_dtype=kv_dtype)
        self.tokenizer = tokenizer
        self.info = info
        self.model_version = 0
        self.cache_manager = CacheManager(max_batch_size, self.runner.context)
        self.scheduler = Scheduler(
            self.cache_manager, max_queue, prefill_chunk, recompute_chunk, prefill_group, max_decode_stall
        )
        self.scheduler.mixed = self.runner.native_prefill
        self.stop_ids = self._stop_ids(model, tokenizer)
        # A request submitted without a timeout still ends by this many seconds: no client can wait forever.
        self.backstop_timeout = backstop_timeout
        # /healthz fails when work is pending and no step has completed for this many seconds.
        self.stall_timeout = stall_timeout
        # A model swap waits this long for running sequences to end, then moves the rest to the new model by
        # recomputing their KV cache; admission is paused meanwhile, so this bounds a reload's stall.
        self.drain_timeout = drain_timeout
        self.on_step: list[Callable[[StepStats], None]] = []
        self.on_swap: list[Callable[[ModelInfo], None]] = []
        # (reason, message) of every reload that did not happen: "swap" here, "load", "non_finite", "val_loss"
        # from the checkpoint watcher. metrics.py counts them; `reload_failures` keeps the totals.
        self.on_reload_failed: list[Callable[[str, str], None]] = []
        self.reload_failures: collections.Counter[str] = collections.Counter()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._started = False
        self._stopping = False
        self._pending_swap: _Swap | None = None
        self._abort_reason: str | None = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self.steps = 0
        self.last_progress = time.monotonic()  # the last completed step, or the last idle wake-up
        self.step_seconds = 0.0  # a moving average of the step time: how many steps a drain has left

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
        self._started = True
        self.last_progress = time.monotonic()
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

    def check_alive(self) -> None:
        """Raise EngineDeadError when the loop thread was started and is no longer running (it died, or the
        engine is stopping): the HTTP layer calls this before queueing a request and answers 503."""
        if self._started and (self._stopping or not self.alive):
            raise EngineDeadError(
                "the engine is not running"
                + (" (stopping)" if self._stopping else ": its thread died; see the server log")
            )

    def health(self) -> str | None:
        """None when healthy; otherwise why not: the loop thread died, or work is pending and no step has
        completed for `stall_timeout` seconds. For the liveness probe (/healthz)."""
        if self._started and not self._stopping and not self.alive:
            return "engine thread died"
        stalled = time.monotonic() - self.last_progress
        if self.scheduler.running or self.scheduler.waiting:
            if stalled > self.stall_timeout:
                return f"engine made no step for {stalled:.0f} s with work pending (limit {self.stall_timeout:g} s)"
        return None

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; raises QueueFullError when MAX_QUEUE requests already wait, EngineDeadError when
        the loop thread is not running. A sequence without a timeout gets the backstop one. It stops (reason stop)
        on the model's end-of-sequence ids and its params' `stop_token_ids`, unless `ignore_eos`."""
        self.check_alive()
        self._prepare(seq)
        self.scheduler.add(seq)
        self.wake()

    def submit_group(self, seqs: list[Sequence]) -> None:
        """Queue `n` sequences sharing one prompt (OpenAI's `n`), each with its own params (seed, seed + 1, ... for
        a seeded request). They are admitted together when `n` cache slots are free, the prompt is prefilled once
        and its KV copied to the others, and each samples its own first token from the shared logits with its own
        generator; then they decode (and may be cancelled) independently. Raises ValueError when the prompts
        differ or `n` exceeds the cache's slots, and as `submit` otherwise."""
        if not seqs:
            raise ValueError("submit_group: no sequences")
        self.check_alive()
        for seq in seqs:
            self._prepare(seq)
        if len(seqs) == 1:
            self.scheduler.add(seqs[0])
        else:
            self.scheduler.add_group(seqs)
        self.wake()

    def _prepare(self, seq: Sequence) -> None:
        if not seq.ignore_eos:
            seq.stop_ids = (seq.stop_ids or self.stop_ids) | frozenset(seq.params.stop_token_ids)
        if seq.timeout is None:
            seq.timeout = self.backstop_timeout

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

    def swap_model(self, model: Transformer, tokenizer: Tokenizer, info: ModelInfo) -> Future[ModelInfo]:
        """Serve `model` once the running sequences have finished on the old one, or after `drain_timeout`
        seconds, when those still running move to the new model (their prompt and output so far are prefilled
        again on it; none fails). New requests wait meanwhile, but not for a drain that cannot succeed: once
        requests wait and no running sequence could end within what is left of it, the swap happens then.

        All or nothing: the returned future gets `info` once the new model serves, or the exception that stopped
        the swap (the old model then keeps serving; the failure is logged and counted as reason "swap"). A swap
        handed over before the previous one happened replaces it (the earlier future is cancelled)."""
        future: Future[ModelInfo] = Future()
        with self._cond:
            if self._pending_swap is not None:
                self._pending_swap.future.cancel()
            self._pending_swap = _Swap(model, tokenizer, info, future, time.monotonic())
            self.scheduler.admit_paused = True
            self._cond.notify_all()
        return future

    @property
    def swap_pending(self) -> bool:
        return self._pending_swap is not None

    def report_reload_failure(self, reason: str, message: str) -> None:
        """Count a reload that did not happen (any thread); the old model keeps serving."""
        log.error("reload failed (%s): %s; still serving %s", reason, message, self.info.checkpoint)
        self.reload_failures[reason] += 1
        for cb in self.on_reload_failed:
            try:
                cb(reason, message)
            except Exception:
                log.exception("reload-failure callback failed")

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
    def _stop_ids(model: Transformer, tokenizer: Tokenizer) -> frozenset[int]:
        ids: set[int | None] = {model.config.eos_token_id, getattr(tokenizer, "eos_token_id", None)}
        return frozenset(i for i in ids if i is not None)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._has_work():
                        self.last_progress = time.monotonic()
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
        finally:
            if not self._stopping:
                # Dying for any other reason (a bug, a BaseException): nobody would ever answer what is queued.
                log.critical("engine thread exiting unexpectedly; failing every queued request")
                self._fail_running("engine thread died", waiting=True)

    def _has_work(self) -> bool:
        if self._abort_reason is not None:
            return True
        return self.scheduler.has_work() or self._swap_due(time.monotonic())

    def _swap_due(self, now: float) -> bool:
        swap = self._pending_swap
        if swap is None:
            return False
        running = self.scheduler.running
        left = swap.requested + self.drain_timeout - now
        if not running or left <= 0:
            return True
        # New requests wait while the drain lasts. Once every running sequence needs more steps than the drain has
        # left (long streams), waiting on gains nothing: they move to the new model at the timeout anyway. Measured
        # with bench/reload.py: under 16 long streams each reload held new requests for the whole drain.
        if not self.scheduler.waiting or self.step_seconds <= 0:
            return False
        steps_left = left / self.step_seconds
        return all(s.max_tokens - len(s.output_ids) > steps_left for s in running)

    def step(self) -> StepStats:
        """One engine step: expire/cancel, maybe swap the model, admit, run one batch, postprocess.

        What the step collected is delivered even when it raises: a request that finished or expired before the
        failure gets its events, the ones still running are failed by the caller (`_run`)."""
        now = started = time.monotonic()
        stats = StepStats()
        events: list[tuple[Sequence, StreamEvent]] = []
        try:
            self._finish_events(self.scheduler.expire(now, stats), events)
            if self._swap_due(now):
                self._apply_swap(events, stats)
            for seq in self.scheduler.admit(now, stats):
                seq.model_version = self.model_version
                seq.decoder = IncrementalDecoder(self.tokenizer)
                if seq.params.needs_history and seq.history is None:
                    seq.history = TokenHistory(seq.params, seq.prompt_ids, end_ids=seq.stop_ids)
            batch = self.scheduler.schedule(now)
            if batch is not None:
                out = self.runner.run(batch)
                now = time.monotonic()
                for seq in self.scheduler.postprocess(batch, out.tokens, now, stats, out.logprobs):
                    self._emit_token(seq, now, stats, events)
            self.steps += 1
            self.last_progress = time.monotonic()
            if batch is not None:
                self.step_seconds = 0.8 * self.step_seconds + 0.2 * (self.last_progress - started)
        finally:
            self._publish(stats, events)
        return stats

    def _publish(self, stats: StepStats, events: list[tuple[Sequence, StreamEvent]]) -> None:
        for cb in self.on_step:  # before delivery: a client that got its answer sees it in the metrics
            try:
                cb(stats)
            except Exception:  # a metrics bug must not swallow the events
                log.exception("on_step callback failed")
        self._deliver(events)

    def _emit_token(self, seq: Sequence, now: float, stats: StepStats, events: list) -> None:
        """The text event of the token the scheduler just appended, then the finish event if it ended.

        Exactly one token event per generated token, even when its text is empty (an end-of-sequence token, part
        of a UTF-8 character, text held back as a possible stop-string prefix), so that a client's count of
        events equals usage.completion_tokens. Text flushed at the end rides on the last token's event.
        """
        tok = seq.output_ids[-1]
        if tok in seq.stop_ids:
            text = ""
        else:
            assert seq.decoder is not None  # set at admission
            text, hit = seq.append_text(seq.decoder.step(tok))
            if hit:
                self.scheduler.finish(seq, FinishReason.STOP, now, stats)
        if seq.finished:
            text += seq.flush_text()
        events.append((seq, StreamEvent(text=text, index=len(seq.output_ids) - 1, logprobs=seq.last_logprobs)))
        if seq.finished:
            self._finish_events([seq], events)

    @staticmethod
    def _finish_events(seqs: list[Sequence], events: list) -> None:
        for seq in seqs:
            assert seq.finish_reason is not None
            events.append(
                (seq, StreamEvent(finish_reason=seq.finish_reason, index=len(seq.output_ids), error=seq.error))
            )

    def _fail_running(self, message: str, waiting: bool = False) -> None:
        """End every running sequence (and with `waiting`, every queued one) with an error event."""
        now = time.monotonic()
        stats = StepStats()
        events: list[tuple[Sequence, StreamEvent]] = []
        failed = self.scheduler.fail(self.scheduler.running, message, now, stats)
        if waiting:
            failed += self.scheduler.fail(self.scheduler.waiting, message, now, stats)
        self._finish_events(failed, events)
        self._publish(stats, events)

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

    def _apply_swap(self, events: list, stats: StepStats) -> None:
        with self._cond:
            swap, self._pending_swap = self._pending_swap, None
        assert swap is not None
        try:
            self._swap(swap.model, swap.tokenizer, swap.info, events, stats)
        except Exception as e:
            self.scheduler.admit_paused = False
            self.report_reload_failure("swap", f"{swap.info.checkpoint}: {type(e).__name__}: {e}")
            swap.future.set_exception(e)
            return
        swap.future.set_result(swap.info)
        for cb in self.on_swap:
            cb(swap.info)

    def _swap(self, model: Transformer, tokenizer: Tokenizer, info: ModelInfo, events: list, stats: StepStats) -> None:
        """Everything that can fail comes before anything changes: a failed swap leaves the old model serving."""
        started = time.monotonic()
        stop_ids = self._stop_ids(model, tokenizer)
        old_context = self.runner.context
        self.runner.set_model(model)  # all or nothing; clears the KV cache
        self.scheduler.mixed = self.runner.native_prefill
        self.cache_manager.forget()  # so no free slot's remembered prefix is valid any more
        moved = self._move_running(events, stats)
        if self.runner.context != old_context:
            self.cache_manager = CacheManager(self.cache_manager.max_slots, self.runner.context)
            self.scheduler.cache = self.cache_manager
            for seq in moved:  # same number of slots: all fit
                seq.slot = self.cache_manager.allocate()
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.info = info
        self.model_version += 1
        self.scheduler.admit_paused = False
        self._recheck_waiting(events, stats)
        # bench/reload.py reads this line (the swap's own time: clearing the KV cache, moving the running).
        log.info("now serving %s (step %s); swap %.3f s", info.checkpoint, info.step or "-", time.monotonic() - started)

    def _move_running(self, events: list, stats: StepStats) -> list[Sequence]:
        """The sequences still running when the drain ended continue on the new model (whose cache no longer holds
        their keys): each is prefilled again from prompt + output so far. One whose tokens fall outside the new
        vocabulary ends with an error, one that no longer fits the new context ends at its length."""
        vocab, context, now = self.vocab_size, self.runner.context, time.monotonic()
        moved = []
        for seq in list(self.scheduler.running):
            top = max(max(seq.prompt_ids), max(seq.output_ids, default=0))
            if top >= vocab:
                error = f"token id {top} is outside the new model's vocabulary ({vocab})"
                self.scheduler.finish(seq, FinishReason.ERROR, now, stats, error=error)
            elif seq.num_prompt >= context:
                error = f"prompt ({seq.num_prompt} tokens) exceeds the new context ({context})"
                self.scheduler.finish(seq, FinishReason.ERROR, now, stats, error=error)
            elif seq.total_len >= context:
                self.scheduler.finish(seq, FinishReason.LENGTH, now, stats)
            else:
                seq.recompute()
                seq.model_version = self.model_version + 1
                self.cache_manager.set_tokens(seq.slot, 0)
                moved.append(seq)
                continue
            self._finish_events([seq], events)
        if moved:
            log.info("moved %d running sequences to the new model (recomputing their KV cache)", len(moved))
        return moved

    def _recheck_waiting(self, events: list, stats: StepStats) -> None:
        """Requests queued against the old model were checked against its vocabulary and context: those that no
        longer fit the new one end with an error instead of reaching the model."""
        vocab, context, now = self.vocab_size, self.runner.context, time.monotonic()
        for seq in list(self.scheduler.waiting):
            error = None
            if max(seq.prompt_ids) >= vocab:
                error = f"prompt token id {max(seq.prompt_ids)} is outside the new model's vocabulary ({vocab})"
            elif seq.num_prompt >= context:
                error = f"prompt ({seq.num_prompt} tokens) exceeds the new context ({context})"
            if error is not None:
                self.scheduler.finish(seq, FinishReason.ERROR, now, stats, error=error)
                self._finish_events([seq], events)


@dataclass
class _Swap:
    model: Transformer
    tokenizer: Tokenizer
    info: ModelInfo
    future: Future[ModelInfo]
    requested: float  # time.monotonic() when it was handed over


def _dispatch(events: list[tuple[Sequence, StreamEvent]]) -> None:
    for seq, event in events:
        if seq.emit is not None:
            seq.emit(seq, event)
