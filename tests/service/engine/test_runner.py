"""The model runner: packed prefill rows, padding near the end of the cache."""

from __future__ import annotations

from service.engine import FinishReason, Sequence
from tests.service.engine.conftest import GREEDY, run


def test_prefill_padding_near_the_end_of_the_cache(make_engine, tokenizer):
    # Chunks are padded to a multiple of PREFILL_ALIGN tokens; near max_len the padding is clamped inside the cache and
    # must not change the answer.
    p = tokenizer.encode("a long prompt " * 40, add_special_tokens=False)[:58]
    whole = Sequence(p, 5, GREEDY, ignore_eos=True)
    run(make_engine(max_context=64), [whole])
    chunked = Sequence(p, 5, GREEDY, ignore_eos=True)
    run(make_engine(max_context=64, prefill_chunk=50), [chunked])
    assert whole.finish_reason is FinishReason.LENGTH and chunked.output_ids == whole.output_ids
