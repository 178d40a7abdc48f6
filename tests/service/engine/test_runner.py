"""The model runner: packed prefill rows, padding near the end of the cache."""

from __future__ import annotations

from service.engine import FinishReason, Sequence
from tests.service.conftest import tiny_model
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


def test_native_int4_prompts_are_not_padded(make_engine, tokenizer, monkeypatch):
    """The native int4 layers keep no per-shape kernels, so a prompt row costs only its own tokens there, whether
    the blocks run fused or one by one (a row over the fused limit); other models pad it to PREFILL_ALIGN (oneDNN
    caches a kernel per shape)."""
    import pytest

    from model import native
    from model.quant import quantize_model
    from service.engine.runner import PREFILL_ALIGN

    if native.native_kernels() is None:
        pytest.skip("no native kernels here")
    prompt = tokenizer.encode("one two three four five six seven eight nine ten eleven", add_special_tokens=False)
    assert len(prompt) % PREFILL_ALIGN
    padded = -(-len(prompt) // PREFILL_ALIGN) * PREFILL_ALIGN
    for quant, fused_limit, expected in (
        ("none", native.FUSED_MAX_ROWS, padded),
        ("int4", native.FUSED_MAX_ROWS, len(prompt)),
        ("int4", len(prompt) - 1, len(prompt)),
    ):
        monkeypatch.setattr(native, "FUSED_MAX_ROWS", fused_limit)
        engine = make_engine()
        model = engine.runner.model
        if quant == "int4":
            model = tiny_model(0)
            quantize_model(model, "int4")
            engine.runner.set_model(model)
        rows: list[int] = []
        forward = model.forward

        def spy(idx, *args, rows=rows, forward=forward, **kwargs):
            rows.append(idx.shape[1] if idx.shape[0] == 1 else 0)
            return forward(idx, *args, **kwargs)

        monkeypatch.setattr(model, "forward", spy)
        seq = Sequence(prompt, 3, GREEDY, ignore_eos=True)
        run(engine, [seq])
        assert rows[0] == expected and seq.finish_reason is FinishReason.LENGTH
        assert all(t is not None for t in seq.output_ids)
        monkeypatch.undo()
