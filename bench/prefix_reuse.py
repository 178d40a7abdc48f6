"""Prefix reuse on the embedded model: TTFT of a conversation's second turn (whose prompt extends the first turn's
prompt and answer, ~1,500 tokens) against the first turn's. Not a test (it takes the real model and a minute):

    .venv/bin/python -m bench.prefix_reuse [--threads 2] [--prefill-chunk 512]
"""

from __future__ import annotations

import argparse

import torch

from model.bundled import default_checkpoint
from model.checkpoint import load_model
from model.sampling import SamplingParams
from model.tokenizer import load_tokenizer
from service.engine import Engine, Sequence
from service.engine.loop import ModelInfo

GREEDY = SamplingParams(temperature=0.0)


def _turn(engine: Engine, prompt: list[int], max_tokens: int) -> Sequence:
    seq = Sequence(prompt, max_tokens, GREEDY)
    engine.submit(seq)
    while not seq.finished:
        engine.step()
    return seq


def _encode_chat(tok, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok.encode(text, add_special_tokens=False))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--answer-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = default_checkpoint()
    tok = load_tokenizer(path)
    model = load_model(path, dtype=torch.float32, device="cpu")
    engine = Engine(
        model,
        tok,
        max_batch_size=4,
        max_context=2048,
        max_queue=8,
        prefill_chunk=args.prefill_chunk,
        info=ModelInfo("bundled"),
    )
    story = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog near the river bank." for i in range(76))
    messages = [{"role": "user", "content": f"Here is a long text.\n{story}\nSummarise it in one sentence."}]
    first = _encode_chat(tok, messages)
    _turn(engine, tok.encode("warm up", add_special_tokens=False), 2)  # one-off allocations out of the timing
    t1 = _turn(engine, first, args.answer_tokens)
    messages += [
        {"role": "assistant", "content": tok.decode(t1.output_ids, skip_special_tokens=True)},
        {"role": "user", "content": "Now say it in five words."},
    ]
    second = _encode_chat(tok, messages)
    t2 = _turn(engine, second, args.answer_tokens)
    ttft1 = t1.first_token_time - t1.arrival_time  # type: ignore[operator]
    ttft2 = t2.first_token_time - t2.arrival_time  # type: ignore[operator]
    print(f"threads={args.threads} prefill_chunk={args.prefill_chunk} fp32")
    print(f"turn 1: prompt {t1.num_prompt} tokens, reused {t1.prefix_hit}, TTFT {ttft1 * 1e3:.0f} ms")
    print(f"turn 2: prompt {t2.num_prompt} tokens, reused {t2.prefix_hit}, TTFT {ttft2 * 1e3:.0f} ms")
    print(f"ratio turn2/turn1: {ttft2 / ttft1:.3f}")


if __name__ == "__main__":
    main()
