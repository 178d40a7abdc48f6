"""The engine loop on the tiny model: batching invariance, chunked prefill, events and stop strings, the thread
surviving a failed step, aborts."""

from __future__ import annotations

import pytest
import torch

from model.sampling import SamplingParams
from service.engine import FinishReason, QueueFullError, Sequence
from tests.service.engine.conftest import GREEDY, prompts, run, wait


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_alone_equals_greedy_in_a_full_batch(make_engine, tokenizer, dtype):
    ps = prompts(tokenizer, 6)
    engine = make_engine(dtype)
    solo = []
    for p in ps:
        s = Sequence(p, 16, GREEDY, ignore_eos=True)
        run(engine, [s])
        solo.append(s.output_ids)
    batch = [Sequence(p, 16, GREEDY, ignore_eos=True) for p in ps]  # 6 sequences, 4 slots: some wait
    run(engine, batch)
    assert [s.output_ids for s in batch] == solo
    assert engine.cache_manager.num_free == 4


def test_chunked_prefill_equals_one_pass(make_engine, tokenizer):
    p = tokenizer.encode("a long prompt " * 40, add_special_tokens=False)
    whole = Sequence(p, 12, GREEDY, ignore_eos=True)
    run(make_engine(), [whole])
    engine = make_engine(prefill_chunk=16)
    chunked = Sequence(p, 12, GREEDY, ignore_eos=True)
    short = Sequence(p[:5], 40, GREEDY, ignore_eos=True)
    run(engine, [short])  # warm: short is done
    run(engine, [chunked, Sequence(p[:5], 30, GREEDY, ignore_eos=True)])
    assert chunked.output_ids == whole.output_ids


def test_long_prompt_does_not_stall_running_streams(make_engine, tokenizer):
    engine = make_engine(prefill_chunk=8)
    running = Sequence(tokenizer.encode("hi", add_special_tokens=False), 100, GREEDY, ignore_eos=True)
    engine.submit(running)
    engine.step()
    before = len(running.output_ids)
    engine.submit(Sequence(tokenizer.encode("x " * 200, add_special_tokens=False), 4, GREEDY, ignore_eos=True))
    for _ in range(10):
        engine.step()
    # Prefill chunks and decode steps alternate: the running stream got about half the steps.
    assert len(running.output_ids) - before >= 4


def test_seeded_sampling_is_independent_of_the_batch(make_engine, tokenizer):
    params = SamplingParams(temperature=1.0, top_k=20, seed=3)
    ps = prompts(tokenizer, 4)
    alone = Sequence(ps[0], 15, params, ignore_eos=True)
    run(make_engine(), [alone])
    together = [Sequence(ps[0], 15, params, ignore_eos=True)]
    together += [Sequence(p, 15, SamplingParams(temperature=0.8, seed=i), ignore_eos=True) for i, p in enumerate(ps)]
    run(make_engine(), together)
    assert together[0].output_ids == alone.output_ids


def test_eos_stops_and_cancel_frees_the_slot(make_engine, tokenizer):
    engine = make_engine()
    probe = Sequence([1, 2, 3], 5, GREEDY, ignore_eos=True)
    run(engine, [probe])
    first = probe.output_ids[0]
    stopped = Sequence([1, 2, 3], 5, GREEDY, stop_ids=frozenset({first}))
    run(engine, [stopped])
    assert stopped.finish_reason is FinishReason.STOP and stopped.output_ids == [first]
    seq = Sequence([1, 2, 3], 1000, GREEDY, ignore_eos=True)
    engine.submit(seq)
    engine.step()
    engine.step()
    assert engine.cache_manager.num_free == 3
    engine.cancel(seq)
    engine.step()
    assert seq.finish_reason is FinishReason.CANCELLED and engine.cache_manager.num_free == 4
    assert not engine.scheduler.running


def test_events_and_stop_string_holdback(make_engine, tokenizer):
    events = []
    probe = Sequence(tokenizer.encode("The", add_special_tokens=False), 30, GREEDY, ignore_eos=True)
    run(make_engine(), [probe])
    text = probe.text
    stop = text[10:14]
    seq = Sequence(probe.prompt_ids, 30, GREEDY, stop=(stop,), ignore_eos=True, emit=lambda s, e: events.append(e))
    run(make_engine(), [seq])
    assert seq.finish_reason is FinishReason.STOP
    assert "".join(e.text for e in events) == text[: text.find(stop)]
    assert events[-1].finish_reason is FinishReason.STOP


def test_context_limit_and_queue(make_engine):
    engine = make_engine(max_context=32, max_batch_size=1, max_queue=1)
    seq = Sequence(list(range(5, 25)), 100, GREEDY, ignore_eos=True)
    run(engine, [seq])
    assert seq.finish_reason is FinishReason.LENGTH and seq.total_len == 32
    engine.submit(Sequence([1], 5, GREEDY))  # takes the free slot at the next step
    engine.submit(Sequence([1], 5, GREEDY))  # waits
    with pytest.raises(QueueFullError):
        engine.submit(Sequence([1], 5, GREEDY))


def test_engine_thread_survives_a_failing_step(make_engine, tokenizer):
    engine = make_engine()
    events = []
    real_run = engine.runner.run
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_run(batch)

    engine.runner.run = flaky
    engine.start()
    try:
        bad = Sequence([1, 2], 50, GREEDY, ignore_eos=True, emit=lambda s, e: events.append(e))
        engine.submit(bad)
        assert wait(lambda: bad.finish_reason is not None)
        assert bad.finish_reason is FinishReason.ERROR and "boom" in events[-1].error
        good = Sequence([1, 2], 5, GREEDY, ignore_eos=True)
        engine.submit(good)
        assert wait(lambda: good.finish_reason is FinishReason.LENGTH)
        assert engine.cache_manager.num_free == 4
    finally:
        engine.stop()


def test_one_token_event_per_generated_token(make_engine, tokenizer):
    # Sampling from the random tiny model yields tokens with no text of their own (parts of a UTF-8 character,
    # special tokens): each still gets its event, and text held back for a stop string and flushed at the end
    # rides on the last one.
    prompt = tokenizer.encode("Hi", add_special_tokens=False)
    for stop in ((), ("e\x00",)):
        events = []
        params = SamplingParams(temperature=1.0, seed=0)
        seq = Sequence(prompt, 300, params, stop=stop, ignore_eos=True, emit=lambda s, e, out=events: out.append(e))
        run(make_engine(), [seq])
        tokens = [e for e in events if e.finish_reason is None]
        assert any(e.text == "" for e in tokens)  # the case this test is about really happened
        assert [e.index for e in tokens] == list(range(len(seq.output_ids)))
        assert "".join(e.text for e in tokens) == seq.text
        assert events[-1].finish_reason is seq.finish_reason and len(events) == len(tokens) + 1
    # The end-of-sequence token gets its (empty) event too.
    probe = Sequence([1, 2, 3], 1, GREEDY, ignore_eos=True)
    run(make_engine(), [probe])
    events = []
    eos = Sequence([1, 2, 3], 5, GREEDY, stop_ids=frozenset(probe.output_ids), emit=lambda s, e: events.append(e))
    run(make_engine(), [eos])
    assert eos.finish_reason is FinishReason.STOP and [(e.text, e.index) for e in events[:-1]] == [("", 0)]


def test_abort_all_ends_running_and_waiting_with_an_error(make_engine):
    engine = make_engine(max_batch_size=1)
    events = []
    running = Sequence([1, 2, 3], 1000, GREEDY, ignore_eos=True, emit=lambda s, e: events.append((s, e)))
    waiting = Sequence([1, 2, 3], 1000, GREEDY, ignore_eos=True, emit=lambda s, e: events.append((s, e)))
    engine.submit(running)
    engine.submit(waiting)
    engine.step()
    engine.abort_all("shutting down")  # the loop thread is not running: handled at once
    ends = [(s, e) for s, e in events if e.finish_reason is not None]
    assert {s for s, _ in ends} == {running, waiting}
    assert all(e.finish_reason is FinishReason.ERROR and e.error == "shutting down" for _, e in ends)
    assert engine.idle() and engine.cache_manager.num_free == 1
