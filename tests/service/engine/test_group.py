"""n > 1 through the engine: one prefill for the shared prompt, its KV copied to the siblings, each choice with its
own seed stream; the group is admitted whole or not at all, and its members end independently."""

from __future__ import annotations

import pytest

from model.sampling import SamplingParams
from service.engine import FinishReason, Sequence
from tests.service.engine.conftest import GREEDY, prompts, run


def _params(seed: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, presence_penalty=0.5)


def _run_group(engine, seqs, max_steps: int = 10_000) -> None:
    engine.submit_group(seqs)
    for _ in range(max_steps):
        if all(s.finished for s in seqs):
            return
        engine.step()
    raise AssertionError("engine did not finish")


def test_seeded_group_equals_separate_requests_and_prefills_once(make_engine, tokenizer):
    p = prompts(tokenizer, 3)[2]
    separate = []
    for seed in (11, 12, 13):
        s = Sequence(p, 12, _params(seed), ignore_eos=True)
        run(make_engine(), [s])  # a fresh engine each: no prefix reuse between them
        separate.append(s.output_ids)
    assert len({tuple(o) for o in separate}) == 3  # different seeds, different answers
    engine = make_engine()
    stats = []
    engine.on_step.append(stats.append)
    group = [Sequence(p, 12, _params(seed), ignore_eos=True) for seed in (11, 12, 13)]
    _run_group(engine, group)
    assert [s.output_ids for s in group] == separate
    assert sum(st.prompt_tokens for st in stats) == len(p)  # the prompt was computed once
    assert engine.cache_manager.num_free == 4


def test_greedy_group_siblings_agree_with_a_single_request(make_engine, tokenizer):
    p = tokenizer.encode("a longer prompt " * 12, add_special_tokens=False)
    assert len(p) > 32
    alone = Sequence(p, 10, GREEDY, ignore_eos=True)
    run(make_engine(), [alone])
    group = [Sequence(p, 10, GREEDY, ignore_eos=True) for _ in range(2)]
    _run_group(make_engine(prefill_chunk=16), group)  # the prompt in chunks: the copy waits for the last
    assert [s.output_ids for s in group] == [alone.output_ids] * 2


def test_group_waits_for_enough_slots_and_members_end_independently(make_engine, tokenizer):
    ps = prompts(tokenizer, 3)
    engine = make_engine()
    busy = [Sequence(ps[0], 6, GREEDY, ignore_eos=True), Sequence(ps[1], 6, GREEDY, ignore_eos=True)]
    for s in busy:
        engine.submit(s)
    engine.step()
    group = [Sequence(ps[2], 20, _params(seed), ignore_eos=True) for seed in (1, 2, 3)]
    engine.submit_group(group)
    while not all(s.finished for s in busy):
        assert all(s.slot == -1 for s in group)  # 2 slots free, 3 needed: none of the group runs
        engine.step()
    engine.step()
    assert all(s.slot >= 0 for s in group)
    for _ in range(3):
        engine.step()
    engine.cancel(group[1])
    while not (group[0].finished and group[2].finished):
        engine.step()
    assert group[1].finish_reason is FinishReason.CANCELLED
    assert [len(s.output_ids) for s in (group[0], group[2])] == [20, 20]
    assert [s.finish_reason for s in (group[0], group[2])] == [FinishReason.LENGTH] * 2


def test_lead_cancelled_before_its_prefill_leaves_the_siblings_to_prefill(make_engine, tokenizer):
    p = prompts(tokenizer, 1)[0]
    alone = Sequence(p, 8, GREEDY, ignore_eos=True)
    run(make_engine(), [alone])
    engine = make_engine()
    group = [Sequence(p, 8, GREEDY, ignore_eos=True) for _ in range(3)]
    group[0].cancel()
    _run_group(engine, group)
    assert group[0].finish_reason is FinishReason.CANCELLED
    assert [s.output_ids for s in group[1:]] == [alone.output_ids] * 2


def test_group_larger_than_the_cache_or_with_different_prompts_is_refused(make_engine, tokenizer):
    ps = prompts(tokenizer, 2)
    engine = make_engine()
    with pytest.raises(ValueError, match="n: 5 choices"):
        engine.submit_group([Sequence(ps[0], 4, GREEDY) for _ in range(5)])
    with pytest.raises(ValueError, match="share one prompt"):
        engine.submit_group([Sequence(ps[0], 4, GREEDY), Sequence(ps[1], 4, GREEDY)])
    assert engine.scheduler.num_waiting == 0
