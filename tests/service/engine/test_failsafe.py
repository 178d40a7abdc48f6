"""Failure paths of the engine, by fault injection: a swap that cannot allocate, a step that raises, a thread that
dies or stalls, requests that time out, queued requests that no longer fit a new model."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from service.engine import EngineDeadError, FinishReason, Sequence
from service.engine.loop import ModelInfo
from tests.service.conftest import TINY_CONFIG, tiny_model
from tests.service.engine.conftest import GREEDY, run, wait


def collect(events: list):
    return lambda s, e: events.append((s, e))


def finishes(events: list) -> dict:
    return {s: e for s, e in events if e.finish_reason is not None}


def test_a_swap_that_cannot_allocate_keeps_the_old_model_serving(make_engine):
    engine = make_engine()
    before = Sequence([1, 2, 3], 8, GREEDY, ignore_eos=True)
    run(engine, [before])
    old_model, old_cache = engine.runner.model, engine.runner.cache
    bigger = tiny_model(1)
    bigger = type(bigger)(TINY_CONFIG.replace(n_layer=3)).eval()  # another shape: needs a new KV cache

    def out_of_memory(*a, **k):
        raise RuntimeError("CPU out of memory")

    bigger.new_kv_cache = out_of_memory
    failures = []
    engine.on_reload_failed.append(lambda reason, msg: failures.append((reason, msg)))
    future = engine.swap_model(bigger, engine.tokenizer, ModelInfo("bigger", "9"))
    engine.step()  # nothing running: the swap is tried now, and fails
    assert isinstance(future.exception(timeout=0), RuntimeError)
    assert engine.runner.model is old_model and engine.runner.cache is old_cache and engine.info.checkpoint == "tiny"
    assert engine.reload_failures["swap"] == 1 and failures[0][0] == "swap" and "out of memory" in failures[0][1]
    assert not engine.swap_pending and not engine.scheduler.admit_paused
    after = Sequence([1, 2, 3], 8, GREEDY, ignore_eos=True)
    run(engine, [after])
    assert after.output_ids == before.output_ids


def test_every_swap_clears_the_kv_cache(make_engine):
    """NaN written by a diverged model must not outlive the swap (masked NaN keys still poison SDPA)."""
    engine = make_engine()
    probe = Sequence([5, 6, 7], 6, GREEDY, ignore_eos=True)
    run(engine, [probe])
    cache = engine.runner.cache
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    engine.swap_model(tiny_model(0), engine.tokenizer, ModelInfo("same shape", "2"))
    engine.step()
    assert engine.runner.cache is cache and torch.isfinite(cache.k).all() and torch.isfinite(cache.v).all()
    again = Sequence([5, 6, 7], 6, GREEDY, ignore_eos=True)
    run(engine, [again])
    assert again.output_ids == probe.output_ids


def test_events_collected_before_a_failing_step_are_delivered(make_engine):
    engine = make_engine()
    events: list = []
    runner_run = engine.runner.run
    fail = threading.Event()

    def flaky(batch):
        if fail.is_set():
            fail.clear()
            raise RuntimeError("boom")
        return runner_run(batch)

    engine.runner.run = flaky
    done = Sequence([1, 2], 2, GREEDY, ignore_eos=True, emit=collect(events))
    running = Sequence([1, 2], 1000, GREEDY, ignore_eos=True, emit=collect(events))
    leaving = Sequence([1, 2], 1000, GREEDY, ignore_eos=True, emit=collect(events))
    for s in (leaving, running):  # slots 0 and 1; `done` takes slot 0 later and decodes before `running`
        engine.submit(s)
    engine.step()
    engine.step()
    # One step in which `leaving` expires (cancelled) before the model runs and raises.
    leaving.cancel()
    fail.set()
    with pytest.raises(RuntimeError, match="boom"):
        engine.step()
    ends = finishes(events)
    assert ends[leaving].finish_reason is FinishReason.CANCELLED  # delivered although the step raised
    # A sequence that finished in the same step as a later failure (here: another row's detokeniser) keeps its
    # events too.
    engine.submit(done)
    engine.step()  # prefill of `done` (alternates with decode)
    assert done.output_ids
    running.decoder.step = lambda tok: (_ for _ in ()).throw(ValueError("bad token"))
    with pytest.raises(ValueError, match="bad token"):
        engine.step()
    ends = finishes(events)
    assert ends[done].finish_reason is FinishReason.LENGTH


def test_every_request_has_a_backstop_deadline(make_engine):
    engine = make_engine(max_batch_size=1, backstop_timeout=0.05)
    hog = Sequence([1, 2], 10_000, GREEDY, ignore_eos=True, timeout=60)
    queued = Sequence([1, 2], 5, GREEDY, ignore_eos=True)  # no timeout given
    engine.submit(hog)
    engine.submit(queued)
    assert queued.timeout == 0.05
    engine.step()
    time.sleep(0.1)
    engine.step()
    assert queued.finish_reason is FinishReason.TIMEOUT and queued.output_ids == []
    assert hog.finish_reason is None


def test_timeout_before_the_first_token_is_timeout_after_it_abort(make_engine):
    engine = make_engine(max_batch_size=1)
    started = Sequence([1, 2], 10_000, GREEDY, ignore_eos=True, timeout=0.05)
    never = Sequence([1, 2], 5, GREEDY, ignore_eos=True, timeout=0.05)
    engine.submit(started)
    engine.submit(never)
    engine.step()
    engine.step()
    time.sleep(0.1)
    engine.step()
    assert started.finish_reason is FinishReason.ABORT and started.output_ids
    assert never.finish_reason is FinishReason.TIMEOUT and never.output_ids == []


class Die(BaseException):
    """Escapes `except Exception`: the engine thread ends."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_thread_fails_its_requests_and_refuses_new_ones(make_engine):
    engine = make_engine()
    events: list = []
    gate = threading.Event()
    runner_run = engine.runner.run

    def dies(batch):
        gate.wait(5)
        raise Die()

    engine.runner.run = dies
    engine.start()
    try:
        seq = Sequence([1, 2], 50, GREEDY, ignore_eos=True, emit=collect(events))
        engine.submit(seq)
        assert engine.health() is None
        gate.set()
        assert wait(lambda: not engine.alive)
        assert wait(lambda: seq.finish_reason is not None)
        assert seq.finish_reason is FinishReason.ERROR and "died" in finishes(events)[seq].error
        assert engine.health() == "engine thread died"
        with pytest.raises(EngineDeadError, match="died"):
            engine.check_alive()
        with pytest.raises(EngineDeadError):
            engine.submit(Sequence([1, 2], 5, GREEDY))
    finally:
        engine.runner.run = runner_run
        engine.stop()


def test_a_stalled_engine_is_unhealthy_only_while_work_waits(make_engine):
    engine = make_engine(stall_timeout=0.1)
    gate = threading.Event()
    runner_run = engine.runner.run

    def stuck(batch):
        gate.wait(10)
        return runner_run(batch)

    engine.runner.run = stuck
    engine.start()
    try:
        time.sleep(0.2)
        assert engine.health() is None  # idle for longer than stall_timeout: fine
        seq = Sequence([1, 2], 3, GREEDY, ignore_eos=True)
        engine.submit(seq)
        assert wait(lambda: engine.health() is not None, timeout=5)
        assert "no step" in engine.health()
        gate.set()
        assert wait(lambda: seq.finish_reason is FinishReason.LENGTH)
        assert wait(lambda: engine.health() is None)
    finally:
        gate.set()
        engine.stop()


def test_queued_requests_are_rechecked_against_the_new_model(make_engine, tokenizer):
    engine = make_engine()
    events: list = []
    new = type(engine.runner.model)(TINY_CONFIG.replace(vocab_size=1000)).eval()
    new.init_weights(seed=0)
    fits = Sequence([1, 2, 3], 3, GREEDY, ignore_eos=True, emit=collect(events))
    too_big = Sequence([1, 5000, 3], 3, GREEDY, ignore_eos=True, emit=collect(events))
    engine.submit(fits)
    engine.submit(too_big)
    engine.swap_model(new, tokenizer, ModelInfo("small vocab"))  # before any step: both still queued
    run(engine, [fits, too_big])
    assert fits.finish_reason is FinishReason.LENGTH and all(t < 1000 for t in fits.output_ids)
    assert too_big.finish_reason is FinishReason.ERROR and "vocabulary (1000)" in finishes(events)[too_big].error


def test_a_mixed_step_that_raises_fails_its_rows_and_the_engine_serves_on(tokenizer):
    """On the native int4 kernels one step can prefill new prompts and decode running streams together. When it
    raises after writing (and here corrupting) its rows' KV, every running request, both kinds in the step among
    them, ends with the error, every slot is free again, and nothing those requests wrote is reused: the same
    prompt afterwards gives the tokens it gives on a fresh engine."""
    from model import native
    from model.quant import quantize_model
    from service.engine import Engine
    from tests.service.engine.conftest import prompts

    if native.native_kernels() is None:
        pytest.skip("no native kernels here")
    model = tiny_model(0)
    quantize_model(model, "int4", int4_kernel="native")

    def engine() -> Engine:
        opts = dict(max_batch_size=4, max_context=512, max_queue=8, prefill_chunk=512, prefill_group=8)
        return Engine(model, tokenizer, info=ModelInfo("tiny-int4"), **opts)

    ps = prompts(tokenizer, 4)
    fresh = Sequence(ps[1], 6, GREEDY, ignore_eos=True)
    run(engine(), [fresh])

    e = engine()
    assert e.scheduler.mixed
    real_run, failed = e.runner.run, []

    def flaky(batch):
        if batch.prefill and batch.decode and not failed:
            failed.append(([it.seq for it in batch.prefill], len(batch.decode)))
            real_run(batch)
            k, v = e.runner.cache.k, e.runner.cache.v  # (layer, slot, head, position, dim)
            for slot, written in [(it.seq.slot, it.end) for it in batch.prefill] + [
                (s.slot, s.total_len) for s in batch.decode
            ]:
                k[:, slot, :, :written] = float("nan")
                v[:, slot, :, :written] = float("nan")
            raise RuntimeError("boom in a mixed step")
        return real_run(batch)

    e.runner.run = flaky
    events: list = []
    e.start()
    try:
        running = Sequence(ps[0], 400, GREEDY, ignore_eos=True, emit=collect(events))
        e.submit(running)
        assert wait(lambda: len(running.output_ids) >= 2 or running.finish_reason is not None)
        assert running.finish_reason is None  # still decoding when the others arrive
        arriving = [Sequence(p, 6, GREEDY, ignore_eos=True, emit=collect(events)) for p in ps[1:]]
        for s in arriving:
            e.submit(s)
        assert wait(lambda: all(s.finish_reason is not None for s in [running, *arriving]))
        # The step that raised held the running stream and new prompts, the one asked again among them.
        assert failed and failed[0][1] == 1 and arriving[0] in failed[0][0]
        ends = finishes(events)
        for s in [running, *arriving]:
            assert s.finish_reason is FinishReason.ERROR and "boom in a mixed step" in ends[s].error, s.finish_reason
        assert wait(lambda: e.cache_manager.num_free == 4)
        again = Sequence(ps[1], 6, GREEDY, ignore_eos=True)
        e.submit(again)
        assert wait(lambda: again.finish_reason is not None)
        assert again.finish_reason is FinishReason.LENGTH and again.output_ids == fresh.output_ids
    finally:
        e.stop()
