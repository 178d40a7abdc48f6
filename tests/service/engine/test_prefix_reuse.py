"""Prefix reuse (llama.cpp's slot reuse): a free slot remembers the tokens whose KV it holds, and a prompt that
starts with them skips computing those positions, with the same output as computing them. Prompts that begin alike
while running (SGLang's in-batch prefix caching) compute the shared part once."""

from __future__ import annotations

import pytest

from service.engine import Engine, Sequence
from service.engine.cache_manager import CacheManager
from service.engine.loop import ModelInfo
from service.engine.scheduler import MIN_SHARED_PREFIX
from service.metrics import Metrics
from tests.service.conftest import tiny_model
from tests.service.engine.conftest import GREEDY, run


def _stats(engine) -> list:
    seen: list = []
    engine.on_step.append(seen.append)
    return seen


def _hits(stats) -> tuple[int, int]:
    return sum(s.prefix_hit_tokens for s in stats), sum(s.prefix_query_tokens for s in stats)


def _turns(tokenizer):
    first = tokenizer.encode("User: tell me about the sea and the sky.\nAssistant:", add_special_tokens=False)
    follow = tokenizer.encode("\nUser: and the mountains?\nAssistant:", add_special_tokens=False)
    return first, follow


def test_second_turn_reuses_the_first_turns_prompt_and_answer(make_engine, tokenizer):
    first, follow = _turns(tokenizer)
    engine = make_engine()
    turn1 = Sequence(first, 12, GREEDY, ignore_eos=True)
    run(engine, [turn1])
    second = first + turn1.output_ids + follow
    stats = _stats(engine)
    turn2 = Sequence(second, 12, GREEDY, ignore_eos=True)
    run(engine, [turn2])
    # Everything written: the prompt and every answer token but the last (sampled, never fed to the model).
    shared = len(first) + len(turn1.output_ids) - 1
    assert turn2.prefix_hit == shared and _hits(stats) == (shared, len(second))
    assert sum(s.prompt_tokens for s in stats) == len(second) - shared
    fresh = Sequence(second, 12, GREEDY, ignore_eos=True)
    run(make_engine(), [fresh])
    assert turn2.output_ids == fresh.output_ids  # fp32: the reused positions hold what recomputing gives

    metrics = Metrics()
    for s in stats:
        metrics.observe_step(s)
    assert metrics.registry.get_sample_value("smollm_prefix_cache_hit_tokens_total") == shared
    assert metrics.registry.get_sample_value("smollm_prefix_cache_query_tokens_total") == len(second)


def test_a_prompt_equal_to_the_held_tokens_still_computes_its_last_token(make_engine, tokenizer):
    first, _ = _turns(tokenizer)
    engine = make_engine()
    run(engine, [Sequence(first, 4, GREEDY, ignore_eos=True)])
    stats = _stats(engine)
    again = Sequence(first, 4, GREEDY, ignore_eos=True)
    run(engine, [again])
    assert _hits(stats) == (len(first) - 1, len(first)) and sum(s.prompt_tokens for s in stats) == 1
    fresh = Sequence(first, 4, GREEDY, ignore_eos=True)
    run(make_engine(), [fresh])
    assert again.output_ids == fresh.output_ids


def test_a_different_prompt_gets_no_hit_and_the_best_slot_is_chosen(make_engine, tokenizer):
    first, follow = _turns(tokenizer)
    other = tokenizer.encode("Something else entirely, about trains.", add_special_tokens=False)
    assert other[0] != first[0]
    engine = make_engine()
    a, b = Sequence(other, 6, GREEDY, ignore_eos=True), Sequence(first, 6, GREEDY, ignore_eos=True)
    run(engine, [a, b])  # a in slot 0, b in slot 1
    stats = _stats(engine)
    fresh = Sequence(follow, 4, GREEDY, ignore_eos=True)
    run(engine, [fresh])
    assert _hits(stats) == (0, len(follow))
    stats.clear()
    turn2 = Sequence(first + b.output_ids + follow, 4, GREEDY, ignore_eos=True)
    run(engine, [turn2])
    assert _hits(stats)[0] == len(first) + len(b.output_ids) - 1  # slot 1 chosen over the lower free slot


def test_nothing_is_reused_after_a_model_swap(make_engine, tokenizer):
    first, follow = _turns(tokenizer)
    engine = make_engine()
    turn1 = Sequence(first, 8, GREEDY, ignore_eos=True)
    run(engine, [turn1])
    future = engine.swap_model(engine.runner.model, tokenizer, ModelInfo("tiny-again"))
    engine.step()
    assert future.result(timeout=0).checkpoint == "tiny-again"
    stats = _stats(engine)
    turn2 = Sequence(first + turn1.output_ids + follow, 8, GREEDY, ignore_eos=True)
    run(engine, [turn2])
    assert _hits(stats) == (0, turn2.num_prompt)


def test_an_errored_sequence_leaves_nothing_to_reuse():
    cm = CacheManager(max_slots=2, max_len=16)
    slot = cm.allocate()
    cm.free(slot, [1, 2, 3])
    assert cm.allocate_for([1, 2, 9]) == (slot, 2)
    cm.free(slot, None)
    assert cm.allocate_for([1, 2, 9]) == (0, 0)
    cm.free(0, [5, 6])
    cm.forget()
    assert cm.allocate_for([5, 6]) == (0, 0)


@pytest.mark.parametrize("max_tokens", [8, 1])
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_prompts_sharing_a_beginning_in_one_burst_get_the_tokens_each_gets_alone(
    make_engine, tokenizer, quant, max_tokens
):
    """A burst whose prompts share a system prompt (one twice): the shared positions are computed once and copied
    (from the running sequence that computed them; with one token each, from the slot it left), and each request
    gets the tokens it gets alone, on the PyTorch path and on the native int4 kernels (mixed steps)."""
    system = tokenizer.encode("System: you are a helpful assistant who answers briefly.\n", add_special_tokens=False)
    questions = ["Why is the sea blue?", "Name a bird.", "Why is the sea blue?", "Count to 3."]
    ps = [system + tokenizer.encode(q, add_special_tokens=False) for q in questions]
    assert ps[0] == ps[2] and len(system) >= MIN_SHARED_PREFIX

    def engine():
        if quant == "none":
            return make_engine(max_batch_size=8)
        from model import native
        from model.quant import quantize_model

        if native.native_kernels() is None:
            pytest.skip("no native kernels here")
        model = tiny_model(0)
        quantize_model(model, "int4", int4_kernel="native")
        return Engine(
            model,
            tokenizer,
            info=ModelInfo("tiny-int4"),
            max_batch_size=8,
            max_context=512,
            max_queue=8,
            prefill_chunk=512,
        )

    alone = []
    for p in ps:
        s = Sequence(p, max_tokens, GREEDY, ignore_eos=True)
        run(engine(), [s])
        alone.append(s.output_ids)
    e = engine()
    stats = _stats(e)
    burst = [Sequence(p, max_tokens, GREEDY, ignore_eos=True) for p in ps]
    run(e, burst)
    assert [s.output_ids for s in burst] == alone
    # Computed: the first prompt whole, then each other one's own part (the twin: its last token).
    own = len(ps[1]) - len(system) + 1 + len(ps[3]) - len(system)
    assert sum(s.prompt_tokens for s in stats) == len(ps[0]) + own
    assert _hits(stats) == (2 * len(system) + len(ps[2]) - 1, sum(len(p) for p in ps))
