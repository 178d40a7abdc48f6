"""SMOLLM_COMPILE=decode: the torch.compile'd decode step gives eager's greedy tokens, alone and in a padded batch
of mixed lengths, and a failed compile falls back to eager with a warning."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from service.engine import Engine, FinishReason, Sequence
from service.engine.compiled_decode import CompiledDecode, batch_buckets, bucket
from service.engine.loop import ModelInfo
from service.engine.runner import ModelRunner
from tests.service.conftest import tiny_model
from tests.service.engine.conftest import GREEDY, prompts, run

# max_context 64 keeps every step in one key bucket, so the whole module compiles two graphs (batch 1 and 4).
OPTS = dict(max_batch_size=4, max_context=64)


def generate(engine, token_lists: list[list[int]], max_tokens: int = 8) -> list[list[int]]:
    seqs = [Sequence(p, max_tokens, GREEDY, ignore_eos=True) for p in token_lists]
    run(engine, seqs)
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    return [s.output_ids for s in seqs]


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(1) == [1]
    assert [bucket(n, [1, 2, 4, 6]) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]
    with pytest.raises(ValueError, match="exceeds"):
        bucket(7, [1, 2, 4, 6])


def test_unknown_mode_is_refused(make_engine):
    model = make_engine().runner.model
    with pytest.raises(ValueError, match="compile: 'graphs'"):
        ModelRunner(model, 4, 64, compile="graphs")


def test_compiled_decode_gives_eager_tokens_alone_and_in_a_batch(make_engine, tokenizer):
    ps = prompts(tokenizer, 3)  # three prompt lengths
    assert len({len(p) for p in ps}) == 3
    eager = make_engine(**OPTS)
    alone_eager = generate(eager, ps[2:])
    batch_eager = generate(eager, ps)

    engine = make_engine(compile="decode", **OPTS)
    compiled = engine.runner.compiled
    assert compiled is not None
    # The scratch slot that padding rows write lies past the scheduler's slots.
    assert engine.runner.cache.max_slots == 5 and compiled.scratch_slot == 4
    assert generate(engine, ps[2:]) == alone_eager
    assert generate(engine, ps) == batch_eager  # 3 rows padded to 4
    assert not compiled.failed
    assert compiled.seen == {(1, 64), (4, 64)}
    assert batch_eager[2] == alone_eager[0]  # and the property itself: alone == in a batch


def test_failed_compile_falls_back_to_eager_with_a_warning(make_engine, tokenizer, monkeypatch, caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("injected compiler failure")

    monkeypatch.setattr(
        "service.engine.compiled_decode.compile_options",
        lambda device: {"backend": broken_backend, "dynamic": False},
    )
    ps = prompts(tokenizer, 2)
    expected = generate(make_engine(**OPTS), ps)
    engine = make_engine(compile="decode", **OPTS)
    with caplog.at_level(logging.WARNING, logger="service.engine.compiled_decode"):
        assert generate(engine, ps) == expected
    assert engine.runner.compiled is not None and engine.runner.compiled.failed
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "decoding eagerly from now on" in warnings[0].getMessage()
    assert "injected compiler failure" in caplog.text
    torch._dynamo.reset()


def test_each_new_compiled_step_compiles_afresh_however_many_came_before(make_engine):
    """Dynamo counts graphs per code object: without dropping its predecessors' graphs, the ninth CompiledDecode
    in a process (eight hot reloads) would hit the recompile limit and run eagerly, its compiler never called."""
    model = make_engine().runner.model
    compiled_by: list[int] = []

    def backend_of(i: int):
        def backend(gm, example_inputs):
            compiled_by.append(i)
            return gm.forward

        return backend

    for i in range(torch._dynamo.config.recompile_limit + 2):
        cache = model.new_kv_cache(max_slots=2, max_len=64)
        step = CompiledDecode(model, cache, scratch_slot=1, pad_id=0, kv_align=64, options={"backend": backend_of(i)})
        assert step([5], [0], [3], 4) is not None and not step.failed
    assert compiled_by == list(range(torch._dynamo.config.recompile_limit + 2))


def test_a_swapped_model_decodes_with_its_own_weights(make_engine, tokenizer, monkeypatch):
    # dynamo with its eager backend: the same guards and graph capture as inductor without its compile time.
    monkeypatch.setattr(
        "service.engine.compiled_decode.compile_options",
        lambda device: {"backend": "eager", "dynamic": False, "fullgraph": True},
    )
    ps = prompts(tokenizer, 2)
    other = tiny_model(1)
    expected_first = generate(make_engine(**OPTS), ps)
    expected_other = generate(
        Engine(other, tokenizer, info=ModelInfo("other"), max_queue=8, prefill_chunk=512, **OPTS), ps
    )
    assert expected_other != expected_first
    engine = make_engine(compile="decode", **OPTS)
    assert generate(engine, ps) == expected_first
    first = engine.runner.compiled
    future = engine.swap_model(other, tokenizer, ModelInfo("other", "2"))
    engine.step()  # idle: the swap happens at once
    assert future.result(timeout=0).step == "2"
    assert engine.runner.compiled is not first and engine.runner.compiled.cache is engine.runner.cache
    assert generate(engine, ps) == expected_other
    assert engine.runner.compiled.seen and not engine.runner.compiled.failed
    torch._dynamo.reset()


def test_the_compiled_step_writes_only_the_rows_it_decodes(make_engine):
    model = make_engine().runner.model
    cache = model.new_kv_cache(max_slots=5, max_len=256)
    step = CompiledDecode(model, cache, scratch_slot=4, pad_id=0, kv_align=64)
    with torch.inference_mode():
        logits, code = run_and_get_code(step, [7], [2], [3], 64)
    assert logits is not None and logits.shape == (1, model.config.vocab_size) and not step.failed
    # A write through a view of the cache compiled into a copy of every layer's whole cache each step: loops
    # `for(x0=0; x0<40960L; ...)` over a layer here. The generated code must have no loop of a layer's size.
    layer_numel = cache.k[0].numel()
    assert not re.search(rf"<static_cast<int64_t>\({layer_numel}L\)", "\n".join(code))
    written = cache.k.abs().sum(dim=(0, 2, 4)) > 0  # (slots, positions)
    assert written[2, 3] and written.sum() == 1
    torch._dynamo.reset()
