"""The engine without HTTP: batching invariance, chunked prefill, stop strings, slots and the scheduler."""

from __future__ import annotations

import pytest
import torch

from model.sampling import SamplingParams
from service.engine import Engine, FinishReason, QueueFullError, Sequence
from service.engine.cache_manager import CacheManager
from service.engine.loop import ModelInfo
from tests.service.conftest import tiny_model

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def make_engine(tokenizer):
    models = {}

    def make(dtype=torch.float32, **kw) -> Engine:
        if dtype not in models:
            models[dtype] = tiny_model(0).to(dtype)
        model = models[dtype]
        opts = dict(max_batch_size=4, max_context=512, max_queue=64, prefill_chunk=512)
        opts.update(kw)
        return Engine(model, tokenizer, info=ModelInfo("tiny"), **opts)

    return make


def run(engine: Engine, seqs: list[Sequence], max_steps: int = 10_000) -> None:
    """Drive the engine synchronously (no thread) until every sequence finished."""
    for s in seqs:
        engine.submit(s)
    for _ in range(max_steps):
        if all(s.finish_reason is not None for s in seqs):
            return
        engine.step()
    raise AssertionError("engine did not finish")


def prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.encode(f"Prompt {i}:" + " word" * (3 * i + 1), add_special_tokens=False) for i in range(n)]


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


def test_append_text_holds_back_possible_stop_prefixes():
    seq = Sequence([1], 10, GREEDY, stop=("END", "xyz"))
    assert seq.append_text("hello E") == ("hello ", False)
    assert seq.append_text("N") == ("", False)
    assert seq.append_text("ough") == ("ENough", False)
    assert seq.append_text(" x") == (" ", False)
    assert seq.append_text("yz and more") == ("", True)
    assert seq.text == "hello ENough "
    plain = Sequence([1], 10, GREEDY)
    assert plain.append_text("abc") == ("abc", False)


def test_context_limit_and_queue(make_engine):
    engine = make_engine(max_context=32, max_batch_size=1, max_queue=1)
    seq = Sequence(list(range(5, 25)), 100, GREEDY, ignore_eos=True)
    run(engine, [seq])
    assert seq.finish_reason is FinishReason.LENGTH and seq.total_len == 32
    engine.submit(Sequence([1], 5, GREEDY))  # takes the free slot at the next step
    engine.submit(Sequence([1], 5, GREEDY))  # waits
    with pytest.raises(QueueFullError):
        engine.submit(Sequence([1], 5, GREEDY))


def test_cache_manager_lowest_slot_first():
    cm = CacheManager(3, 10)
    assert [cm.allocate(), cm.allocate(), cm.allocate()] == [0, 1, 2]
    cm.free(1)
    cm.set_tokens(0, 7)
    assert cm.allocate() == 1
    usage = cm.usage()
    assert (usage.slots_used, usage.slots_total, usage.tokens_used, usage.tokens_total) == (3, 3, 7, 30)
    with pytest.raises(RuntimeError):
        cm.allocate()
    with pytest.raises(ValueError):
        cm.free(5)


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
        assert _wait(lambda: bad.finish_reason is not None)
        assert bad.finish_reason is FinishReason.ERROR and "boom" in events[-1].error
        good = Sequence([1, 2], 5, GREEDY, ignore_eos=True)
        engine.submit(good)
        assert _wait(lambda: good.finish_reason is FinishReason.LENGTH)
        assert engine.cache_manager.num_free == 4
    finally:
        engine.stop()


def _wait(pred, timeout=10.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_prefill_packs_prompts_up_to_the_chunk_budget():
    from service.engine.scheduler import Scheduler

    sched = Scheduler(CacheManager(8, 2048), max_queue=8, prefill_chunk=64)
    short = [Sequence(list(range(1, 11)), 4, GREEDY) for _ in range(3)]
    long = Sequence(list(range(1, 101)), 4, GREEDY)
    last = Sequence(list(range(1, 6)), 4, GREEDY)
    for s in [*short, long, last]:
        sched.add(s)
    sched.admit()
    batch = sched.schedule()
    # No padding between packed prompts: the three short ones and as much of the long one as the budget allows.
    assert [(it.seq, it.start, it.end) for it in batch.prefill] == [*((s, 0, 10) for s in short), (long, 0, 34)]
    for it in batch.prefill:
        it.seq.num_cached = it.end
    for s in short:
        sched.remove_running(s)  # as if they finished at once
    batch = sched.schedule()
    assert [(it.seq, it.start, it.end) for it in batch.prefill] == [(long, 34, 98)]
    long.num_cached = 98
    batch = sched.schedule()
    assert [(it.seq, it.start, it.end) for it in batch.prefill] == [(long, 98, 100), (last, 0, 5)]


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


def test_prefill_padding_near_the_end_of_the_cache(make_engine, tokenizer):
    # Chunks are padded to a multiple of PREFILL_ALIGN tokens; near max_len the padding is clamped inside the cache and
    # must not change the answer.
    p = tokenizer.encode("a long prompt " * 40, add_special_tokens=False)[:58]
    whole = Sequence(p, 5, GREEDY, ignore_eos=True)
    run(make_engine(max_context=64), [whole])
    chunked = Sequence(p, 5, GREEDY, ignore_eos=True)
    run(make_engine(max_context=64, prefill_chunk=50), [chunked])
    assert whole.finish_reason is FinishReason.LENGTH and chunked.output_ids == whole.output_ids


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
