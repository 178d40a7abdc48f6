"""Hot swap with a bounded drain: sequences still running after `drain_timeout` move to the new model by
recomputing their KV cache from prompt + output so far; nothing fails, and new requests wait at most the drain."""

from __future__ import annotations

import time

import torch

from service.engine import FinishReason, Sequence
from service.engine.loop import ModelInfo
from tests.service.conftest import TINY_CONFIG, tiny_model
from tests.service.engine.conftest import GREEDY, prompts, run, wait


def drive(engine, seqs, max_steps: int = 10_000) -> None:
    """Step until every (already submitted) sequence finished."""
    for _ in range(max_steps):
        if all(s.finish_reason is not None for s in seqs):
            return
        engine.step()
    raise AssertionError("engine did not finish")


def same_weights(model):
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.to(model.dtype).eval()


def test_running_sequences_continue_on_the_new_model_by_recompute(make_engine, tokenizer):
    """A swap to the same weights in the middle of greedy streams changes nothing in their outputs: the recompute
    prefill writes the same keys the decode steps did, and sampling picks up where it was."""
    ps = prompts(tokenizer, 4)
    reference = [Sequence(p, 40, GREEDY, ignore_eos=True) for p in ps]
    run(make_engine(), reference)
    engine = make_engine(drain_timeout=0.0, prefill_chunk=16)  # chunked: the recompute spans several steps
    seqs = [Sequence(p, 40, GREEDY, ignore_eos=True) for p in ps]
    for s in seqs:
        engine.submit(s)
    for _ in range(12):
        engine.step()
    assert all(0 < len(s.output_ids) < 40 for s in seqs)
    future = engine.swap_model(same_weights(engine.runner.model), tokenizer, ModelInfo("twin", "2"))
    drive(engine, seqs)
    assert future.result(timeout=0).step == "2"
    assert all(s.model_version == 1 and s.finish_reason is FinishReason.LENGTH for s in seqs)
    assert [s.output_ids for s in seqs] == [r.output_ids for r in reference]
    assert engine.cache_manager.num_free == 4


def test_the_recompute_runs_in_short_steps_and_a_new_request_is_served_in_the_middle_of_it(make_engine, tokenizer):
    """After a swap no step recomputes more than `recompute_chunk` tokens, and a request that arrives while the moved
    streams are recomputed gets its first token before the recompute is over; every output is what it would have
    been without the swap (same weights, greedy)."""
    ps = prompts(tokenizer, 4)
    newcomer_prompt = tokenizer.encode("A newcomer asks something" + " else" * 30, add_special_tokens=False)
    assert len(newcomer_prompt) > 16  # more than a recompute chunk: new prompts keep their own budget
    reference = [Sequence(p, 60, GREEDY, ignore_eos=True) for p in ps]
    run(make_engine(), reference)
    alone = Sequence(newcomer_prompt, 8, GREEDY, ignore_eos=True)
    run(make_engine(), [alone])
    engine = make_engine(drain_timeout=0.0, max_batch_size=6, recompute_chunk=16)
    streams = [Sequence(p, 60, GREEDY, ignore_eos=True) for p in ps]
    for s in streams:
        engine.submit(s)
    for _ in range(30):
        engine.step()
    assert all(len(s.output_ids) > 20 for s in streams)
    newcomer = Sequence(newcomer_prompt, 8, GREEDY, ignore_eos=True)
    recomputed: list[int] = []  # tokens of the moved streams each prefill step computed
    real_run = engine.runner.run

    def recording_run(batch):
        if batch.is_prefill:
            recomputed.append(sum(it.end - it.start for it in batch.prefill if it.seq is not newcomer))
        return real_run(batch)

    engine.runner.run = recording_run
    to_recompute = sum(s.total_len for s in streams)
    engine.swap_model(same_weights(engine.runner.model), tokenizer, ModelInfo("twin", "2"))
    engine.step()  # the swap, and the first recompute chunk
    engine.submit(newcomer)
    engine.step()
    # Its prompt went in the step after its arrival, while the moved streams still wait for their history.
    assert newcomer.output_ids and sum(not s.prefilled for s in streams) >= 3
    drive(engine, [*streams, newcomer])
    assert sum(recomputed) == to_recompute and max(recomputed) <= 16
    assert [s.output_ids for s in streams] == [r.output_ids for r in reference]
    assert newcomer.output_ids == alone.output_ids
    assert engine.cache_manager.num_free == 6


def test_moved_sequences_that_no_longer_fit_end_cleanly(make_engine, tokenizer):
    engine = make_engine(drain_timeout=0.0, max_context=512)
    long = Sequence(list(range(1, 40)), 100, GREEDY, ignore_eos=True)
    fine = Sequence([1, 2], 100, GREEDY, ignore_eos=True)
    for s in (long, fine):
        engine.submit(s)
    for _ in range(3):
        engine.step()
    short_context = type(engine.runner.model)(TINY_CONFIG.replace(block_size=40)).eval()
    short_context.init_weights(seed=0)
    engine.swap_model(short_context, tokenizer, ModelInfo("short context"))
    engine.step()
    assert long.finish_reason is FinishReason.LENGTH  # 39 prompt + outputs >= the new 40-token context
    drive(engine, [fine])
    assert fine.finish_reason is FinishReason.LENGTH and fine.total_len == 40 and engine.max_context == 40
    assert engine.cache_manager.num_free == 4

    engine = make_engine(drain_timeout=0.0)
    out_of_vocab = Sequence([1, 2, 3000], 100, GREEDY, ignore_eos=True)
    engine.submit(out_of_vocab)
    engine.step()
    small_vocab = type(engine.runner.model)(TINY_CONFIG.replace(vocab_size=3000)).eval()
    engine.swap_model(small_vocab, tokenizer, ModelInfo("small vocabulary"))
    engine.step()
    assert out_of_vocab.finish_reason is FinishReason.ERROR and "vocabulary (3000)" in out_of_vocab.error
    assert engine.cache_manager.num_free == 4


def test_a_reload_during_long_streams_fails_nothing_and_admits_within_the_drain(make_engine, tokenizer):
    drain = 0.5
    engine = make_engine(max_batch_size=12, drain_timeout=drain)
    ps = prompts(tokenizer, 8)
    reference = [Sequence(p, 300, GREEDY, ignore_eos=True) for p in ps]
    run(make_engine(max_batch_size=12), reference)
    real_run = engine.runner.run

    def slow_run(batch):  # ~300 steps of >= 4 ms: the streams outlive the drain by far
        time.sleep(0.004)
        return real_run(batch)

    engine.runner.run = slow_run
    streams = [Sequence(p, 300, GREEDY, ignore_eos=True, timeout=120) for p in ps]
    engine.start()
    try:
        for s in streams:
            engine.submit(s)
        assert wait(lambda: all(len(s.output_ids) >= 20 for s in streams))
        new_model = tiny_model(1)
        swapped_at = time.monotonic()
        future = engine.swap_model(new_model, tokenizer, ModelInfo("step 2", "2"))
        newcomer = Sequence(ps[0], 5, GREEDY, ignore_eos=True, timeout=120)
        engine.submit(newcomer)
        assert wait(lambda: newcomer.first_token_time is not None, timeout=30)
        assert newcomer.first_token_time - swapped_at < drain + 1.0  # admitted within the drain bound
        assert future.done() and future.exception() is None
        assert any(s.finish_reason is None for s in streams)  # the swap did not wait for the streams to end
        assert wait(lambda: all(s.finish_reason is not None for s in streams), timeout=60)
    finally:
        engine.stop()
    assert all(s.finish_reason is FinishReason.LENGTH and len(s.output_ids) == 300 for s in streams)
    assert newcomer.finish_reason is FinishReason.LENGTH and newcomer.model_version == 1
    for s, r in zip(streams, reference, strict=True):
        cut = next(i for i, (a, b) in enumerate(zip(s.output_ids, r.output_ids, strict=True)) if a != b)
        assert cut >= 20  # the old model's greedy tokens up to the swap, the new model's after
    assert engine.cache_manager.num_free == 12
    assert all(torch.isfinite(torch.tensor(s.output_ids, dtype=torch.float)).all() for s in streams)


def test_the_drain_ends_early_for_waiting_requests_once_no_running_sequence_can_finish_in_it(make_engine, tokenizer):
    """Under long streams a new request does not wait the whole drain out (they would move to the new model at its
    end anyway); a short request running at the swap still finishes on the old model first."""
    drain = 3.0
    engine = make_engine(max_batch_size=8, drain_timeout=drain)
    real_run = engine.runner.run

    def slow_run(batch):  # steps of >= 20 ms: 300 tokens take 6 s, twice the drain
        time.sleep(0.02)
        return real_run(batch)

    engine.runner.run = slow_run
    ps = prompts(tokenizer, 4)
    streams = [Sequence(p, 300, GREEDY, ignore_eos=True, timeout=120) for p in ps]
    short = Sequence(ps[1], 10, GREEDY, ignore_eos=True, timeout=120)
    engine.start()
    try:
        for s in streams:
            engine.submit(s)
        assert wait(lambda: all(len(s.output_ids) >= 20 for s in streams))
        engine.submit(short)
        assert wait(lambda: short.first_token_time is not None)
        swapped_at = time.monotonic()
        future = engine.swap_model(tiny_model(1), tokenizer, ModelInfo("step 2", "2"))
        newcomer = Sequence(ps[0], 5, GREEDY, ignore_eos=True, timeout=120)
        engine.submit(newcomer)
        assert wait(lambda: newcomer.first_token_time is not None, timeout=30)
        assert newcomer.first_token_time - swapped_at < drain - 1.0
        assert future.done() and future.exception() is None and newcomer.model_version == 1
        # The swap waited for the short request (it could end within the drain), not for the streams.
        assert short.finish_reason is FinishReason.LENGTH and short.model_version == 0
        assert all(s.finish_reason is None for s in streams)
        assert wait(lambda: all(s.finish_reason is not None for s in streams), timeout=60)
    finally:
        engine.stop()
    assert all(s.finish_reason is FinishReason.LENGTH and len(s.output_ids) == 300 for s in streams)
    assert all(s.model_version == 1 for s in streams)
