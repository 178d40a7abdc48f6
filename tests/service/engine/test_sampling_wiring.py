"""The sampler's per-request controls through the engine on the tiny model: penalties (with the history the engine
keeps), logprobs on token events, stop_token_ids, and a grammar's mask (structured output)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import service.engine.runner as runner_mod
from model.sampling import SamplingParams, TokenHistory, sample
from service.engine import FinishReason, Sequence
from service.structured_output import StructuredOutput
from tests.service.engine.conftest import GREEDY, prompts, run
from tests.service.test_structured_output import SMALL

PENALISED = SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=0.5)


def _collect(seq: Sequence) -> list:
    events: list = []
    seq.emit = lambda _s, e: events.append(e)
    return events


def test_penalties_change_the_output_and_match_a_hand_run_of_sample(make_engine, tokenizer, monkeypatch):
    p = prompts(tokenizer, 1)[0]
    engine = make_engine()
    plain = Sequence(p, 24, GREEDY, ignore_eos=True)
    run(engine, [plain])
    seen: list[torch.Tensor] = []
    real = runner_mod.sample

    def recording(logits, *args, **kw):
        seen.append(logits.clone())
        return real(logits, *args, **kw)

    monkeypatch.setattr(runner_mod, "sample", recording)
    pen = Sequence(p, 24, PENALISED, ignore_eos=True)
    run(engine, [pen])
    assert pen.history is not None and pen.history.num_generated == 24
    assert pen.output_ids != plain.output_ids
    # The same logits through `sample` by hand, with a history of our own, pick the same tokens.
    history = TokenHistory(PENALISED, p, end_ids=pen.stop_ids)
    by_hand = [int(sample(logits, [PENALISED], [None], [history])[0]) for logits in seen]
    assert by_hand == pen.output_ids


def test_logprob_events_are_finite_and_their_top_1_is_greedy(make_engine, tokenizer):
    ps = prompts(tokenizer, 3)
    engine = make_engine()
    plain = [Sequence(p, 10, GREEDY, ignore_eos=True) for p in ps]
    run(engine, plain)
    asks = Sequence(ps[1], 10, SamplingParams(temperature=0.0, logprobs=3), ignore_eos=True)
    others = [Sequence(ps[0], 10, GREEDY, ignore_eos=True), Sequence(ps[2], 10, GREEDY, ignore_eos=True)]
    events = _collect(asks)
    other_events = _collect(others[0])
    run(engine, [others[0], asks, others[1]])
    assert asks.output_ids == plain[1].output_ids and others[0].output_ids == plain[0].output_ids
    tokens = [e for e in events if e.finish_reason is None]
    assert len(tokens) == 10
    for e, tok in zip(tokens, asks.output_ids, strict=True):
        lp = e.logprobs
        assert lp is not None and lp.token == tok and len(lp.top) == 3
        assert math.isfinite(lp.logprob) and lp.logprob <= 0
        assert lp.top[0][0] == tok and lp.top[0][1] == pytest.approx(lp.logprob)
        assert all(math.isfinite(v) for _, v in lp.top) and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    assert all(e.logprobs is None for e in other_events)


def test_stop_token_ids_end_with_stop(make_engine, tokenizer):
    p = prompts(tokenizer, 1)[0]
    engine = make_engine()
    plain = Sequence(p, 12, GREEDY, ignore_eos=True)
    run(engine, [plain])
    target = plain.output_ids[4]
    expected = plain.output_ids[: plain.output_ids.index(target) + 1]
    seq = Sequence(p, 12, SamplingParams(temperature=0.0, stop_token_ids=(target,)))
    events = _collect(seq)
    run(engine, [seq])
    assert seq.output_ids == expected and seq.finish_reason is FinishReason.STOP
    assert events[-2].text == ""  # the stop token's text is not sent
    # ignore_eos generates through it
    through = Sequence(p, 12, SamplingParams(temperature=0.0, stop_token_ids=(target,)), ignore_eos=True)
    run(engine, [through])
    assert through.output_ids == plain.output_ids and through.finish_reason is FinishReason.LENGTH


def test_seeded_penalised_request_is_the_same_alone_and_in_a_batch(make_engine, tokenizer):
    ps = prompts(tokenizer, 4)
    params = SamplingParams(temperature=0.9, seed=7, presence_penalty=1.0, min_tokens=5, top_p=0.9)
    engine = make_engine()
    alone = Sequence(ps[0], 16, params)
    run(engine, [alone])
    batch = [Sequence(ps[0], 16, params)] + [
        Sequence(p, 16, SamplingParams(temperature=1.0, frequency_penalty=0.5), ignore_eos=True) for p in ps[1:]
    ]
    run(engine, batch)
    assert batch[0].output_ids == alone.output_ids


def test_structured_row_only_uses_allowed_tokens(make_engine, tokenizer):
    engine = make_engine()
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SMALL}}
    p = tokenizer.encode("Some JSON please:", add_special_tokens=False)
    seq = Sequence(p, 60, GREEDY)
    seq.structured = StructuredOutput.from_response_format(fmt, tokenizer, engine.vocab_size)
    plain = Sequence(p, 60, GREEDY, ignore_eos=True)
    run(engine, [seq, plain])
    check = StructuredOutput.from_response_format(fmt, tokenizer, engine.vocab_size)
    assert check is not None
    for tok in seq.output_ids:
        assert check.allowed_tokens()[tok]
        assert check.accept(tok)
    assert seq.finish_reason is FinishReason.STOP and check.is_complete
    json.loads(tokenizer.decode(seq.output_ids))
    assert plain.output_ids != seq.output_ids  # the mask, not the model, made it JSON
