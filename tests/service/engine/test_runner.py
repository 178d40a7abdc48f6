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
            quantize_model(model, "int4", int4_kernel="native")
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


def test_native_int4_mixed_steps_give_each_stream_the_tokens_it_gets_alone(tokenizer, monkeypatch):
    """On the native int4 kernels a step decodes the running streams and prefills new prompts in one pass; every
    row is computed as it would be alone, so a greedy stream's tokens and their log-probabilities do not depend
    on what shares the step. A prompt group too long to fuse runs as a prefill pass then a decode pass."""
    import pytest

    from model import native
    from model.quant import quantize_model
    from model.sampling import SamplingParams
    from service.engine import Engine
    from service.engine.loop import ModelInfo
    from tests.service.engine.conftest import prompts

    if native.native_kernels() is None:
        pytest.skip("no native kernels here")
    model = tiny_model(0)
    quantize_model(model, "int4", int4_kernel="native")
    greedy = SamplingParams(temperature=0.0, logprobs=0)

    def engine() -> Engine:
        opts = dict(max_batch_size=4, max_context=512, max_queue=8, prefill_chunk=512, prefill_group=8)
        return Engine(model, tokenizer, info=ModelInfo("tiny-int4"), **opts)

    def drive(e: Engine, seqs: list[Sequence]) -> list[list[tuple[int, float]]]:
        """The first sequence alone for two steps, then the others arrive; each one's (token, logprob)s."""
        got: list[list[tuple[int, float]]] = [[] for _ in seqs]
        e.submit(seqs[0])
        for n in range(10_000):
            if n == 2:
                for s in seqs[1:]:
                    e.submit(s)
            if all(s.finish_reason is not None for s in seqs):
                return got
            e.step()
            for s, g in zip(seqs, got, strict=True):
                if len(s.output_ids) > len(g):
                    assert s.last_logprobs is not None
                    g.append((s.output_ids[-1], s.last_logprobs.logprob))
        raise AssertionError("engine did not finish")

    ps = prompts(tokenizer, 4)
    for fused_limit in (native.FUSED_MAX_ROWS, 1):
        monkeypatch.setattr(native, "FUSED_MAX_ROWS", fused_limit)
        alone = [drive(engine(), [Sequence(p, 10, greedy, ignore_eos=True)])[0] for p in ps]
        e = engine()
        assert e.scheduler.mixed
        steps: list[tuple[int, int]] = []
        passes: list[str] = []
        runner_run, forward = e.runner.run, model.forward

        def spy_run(batch, steps=steps, runner_run=runner_run):
            steps.append((len(batch.prefill), len(batch.decode)))
            return runner_run(batch)

        def spy_forward(idx, *args, passes=passes, forward=forward, **kwargs):
            passes.append("decode" if kwargs["batch"].segments is None else "packed")
            return forward(idx, *args, **kwargs)

        monkeypatch.setattr(e.runner, "run", spy_run)
        monkeypatch.setattr(model, "forward", spy_forward)
        assert drive(e, [Sequence(p, 10, greedy, ignore_eos=True) for p in ps]) == alone
        mixed_steps = sum(1 for p, d in steps if p and d)
        pure_decode_steps = sum(1 for p, d in steps if d and not p)
        assert mixed_steps >= 2, steps  # the later prompts were prefilled while the first one decoded
        # Fused: a mixed step is one pass; too long to fuse: it adds a decode pass.
        assert passes.count("decode") == pure_decode_steps + (mixed_steps if fused_limit == 1 else 0)
        monkeypatch.undo()
