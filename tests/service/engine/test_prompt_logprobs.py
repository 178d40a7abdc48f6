"""Prompt-token log-probabilities (echo with logprobs) from the prefill, against a direct forward pass."""

from __future__ import annotations

import pytest
import torch

from service.engine import Sequence
from tests.service.engine.conftest import GREEDY, run


def _direct(model, prompt: list[int], k: int) -> tuple[list[float], list[list[int]]]:
    """log_softmax of the previous position's logits at each prompt token 1..T-1, and the top-k ids there."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]))[0].float()  # (T, V): the training pass, no cache
    logp = torch.log_softmax(logits, dim=-1)[:-1]  # (T - 1, V): position p predicts token p + 1
    chosen = logp.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    return chosen.tolist(), logp.topk(k, dim=-1).indices.tolist()


def _scored(engine, prompt: list[int], k: int = 3, **kw) -> Sequence:
    seq = Sequence(prompt, 2, GREEDY, **kw)
    seq.prompt_logprobs = k
    run(engine, [seq])
    return seq


@pytest.mark.parametrize("chunk", [512, 5])
def test_prompt_logprobs_equal_a_direct_forward_pass(make_engine, tokenizer, chunk):
    engine = make_engine(prefill_chunk=chunk)
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog, twice.", add_special_tokens=False)
    seq = _scored(engine, prompt)
    want, top = _direct(engine.runner.model, prompt, 3)
    got = seq.prompt_token_logprobs
    assert [lp.token for lp in got] == prompt[1:]  # token 0 has no logprob: nothing predicts it
    assert [lp.logprob for lp in got] == pytest.approx(want, abs=1e-4)
    assert [[t for t, _ in lp.top] for lp in got] == top
    for lp in got:
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and lp.logprob <= values[0] + 1e-5
    assert len(seq.output_ids) == 2  # generation goes on as usual


def test_scored_prompts_packed_with_others_and_without_top(make_engine, tokenizer):
    engine = make_engine()
    a = tokenizer.encode("Once upon a time there was a cat.", add_special_tokens=False)
    b = tokenizer.encode("Hello world, hello again.", add_special_tokens=False)
    sa, sb, plain = Sequence(a, 3, GREEDY), Sequence(b, 3, GREEDY), Sequence(b, 3, GREEDY)
    sa.prompt_logprobs, sb.prompt_logprobs = 0, 2
    run(engine, [plain, sa, sb])  # one prefill step packs the three prompts
    assert plain.prompt_token_logprobs == []
    assert [lp.top for lp in sa.prompt_token_logprobs] == [[]] * (len(a) - 1)
    for seq, prompt in ((sa, a), (sb, b)):
        want, _ = _direct(engine.runner.model, prompt, 1)
        assert [lp.logprob for lp in seq.prompt_token_logprobs] == pytest.approx(want, abs=1e-4)
    assert sb.output_ids == plain.output_ids  # scoring changes nothing about the generated tokens


def test_a_scored_prompt_is_computed_whole_not_reused_from_the_prefix_cache(make_engine, tokenizer):
    engine = make_engine()
    prompt = tokenizer.encode("A long shared beginning of a conversation, then more.", add_special_tokens=False)
    run(engine, [Sequence(prompt, 4, GREEDY)])
    reused = Sequence(prompt, 2, GREEDY)
    run(engine, [reused])
    assert reused.prefix_hit > 0  # the slot held the prompt: reuse works for plain requests
    scored = _scored(engine, prompt)
    assert scored.prefix_hit == 0
    want, _ = _direct(engine.runner.model, prompt, 1)
    assert [lp.logprob for lp in scored.prompt_token_logprobs] == pytest.approx(want, abs=1e-4)


def test_a_one_token_prompt_has_nothing_to_score(make_engine):
    seq = _scored(make_engine(), [42])
    assert seq.prompt_token_logprobs == [] and len(seq.output_ids) == 2
