"""Structured output's cost per step: the llguidance mask of `response_format` json_object and a json_schema,
timed inside the engine's own decode loop (in-process, greedy), next to the same prompt decoded unconstrained.
Part of `python -m bench` (section `structured`); alone:

    .venv/bin/python -m bench.structured [--threads 2] [--max-tokens 48]

What is timed per step is what the engine adds for a constrained row: `allowed_tokens()` (llguidance fills the
bitmask, `fill_ms`, which is then unpacked to a bool mask) and `accept(token)` (the matcher advances). The first
step of a request is reported apart: llguidance computes more there. `decode ms/token` of the constrained and the
plain run include the model; their difference is the whole overhead (the mask, and the masked sampling path
instead of a bare argmax).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.prefix_reuse import encode_chat
from model.sampling import SamplingParams
from service.engine import Engine, Sequence
from service.engine.loop import ModelInfo
from service.structured_output import StructuredOutput, grammar_for, tokenizer_info

GREEDY = SamplingParams(temperature=0.0)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
FORMATS: dict[str, dict[str, Any]] = {
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
}
PROMPT = "Describe a person as JSON with their name, age and pets."


class TimedStructuredOutput(StructuredOutput):
    """A matcher that records how long each `allowed_tokens` (of it, llguidance's `fill_bitmask`) and `accept` call
    took (seconds)."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int | None = None) -> None:
        super().__init__(grammar, tokenizer, vocab_size)
        self.mask_s: list[float] = []
        self.fill_s: list[float] = []
        self.accept_s: list[float] = []

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        t = time.perf_counter()
        super().fill_bitmask(bitmask, row)
        self.fill_s.append(time.perf_counter() - t)

    def allowed_tokens(self) -> torch.Tensor:
        t = time.perf_counter()
        mask = super().allowed_tokens()
        self.mask_s.append(time.perf_counter() - t)
        return mask

    def accept(self, token_id: int) -> bool:
        t = time.perf_counter()
        ok = super().accept(token_id)
        self.accept_s.append(time.perf_counter() - t)
        return ok


def _run(engine: Engine, prompt: list[int], max_tokens: int, structured: StructuredOutput | None) -> Sequence:
    seq = Sequence(prompt, max_tokens, GREEDY, ignore_eos=structured is None)
    seq.structured = structured
    engine.submit(seq)
    while not seq.finished:
        engine.step()
    return seq


def _decode_ms_per_token(seq: Sequence) -> float | None:
    if len(seq.output_ids) < 2 or seq.first_token_time is None or seq.last_token_time is None:
        return None
    return (seq.last_token_time - seq.first_token_time) * 1e3 / (len(seq.output_ids) - 1)


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def measure(model, tokenizer, *, max_tokens: int = 48, formats: list[str] | None = None) -> dict[str, Any]:
    """Per format: grammar compile time, mask cost per step (first step apart; median and p95 of the rest),
    accept cost, steps, decode ms/token constrained and unconstrained, and whether the output parsed as JSON."""
    vocab = model.config.vocab_size
    engine = Engine(
        model, tokenizer, max_batch_size=2, max_context=1024, max_queue=4, prefill_chunk=512, info=ModelInfo("bench")
    )
    t = time.perf_counter()
    tokenizer_info(tokenizer, vocab)  # once per model in the server (at load); kept out of the per-request figures
    table_ms = (time.perf_counter() - t) * 1e3
    prompt = encode_chat(tokenizer, [{"role": "user", "content": PROMPT}])
    _run(engine, prompt, 2, None)  # one-off allocations out of the timing
    plain = _run(engine, prompt, max_tokens, None)
    out: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "max_tokens": max_tokens,
        "tokenizer_table_ms": table_ms,
        "plain_decode_ms_per_token": _decode_ms_per_token(plain),
        "formats": {},
    }
    for name in formats or list(FORMATS):
        t = time.perf_counter()
        grammar = grammar_for(FORMATS[name])
        assert grammar is not None
        matcher = TimedStructuredOutput(grammar, tokenizer, vocab)
        compile_ms = (time.perf_counter() - t) * 1e3
        seq = _run(engine, prompt, max_tokens, matcher)
        text = tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        try:
            json.loads(text)
            valid = True
        except ValueError:
            valid = False
        rest = [s * 1e3 for s in matcher.mask_s[1:]] or [matcher.mask_s[0] * 1e3]
        out["formats"][name] = {
            "compile_ms": compile_ms,
            "steps": len(matcher.mask_s),
            "first_mask_ms": matcher.mask_s[0] * 1e3,
            "mask_ms_p50": statistics.median(rest),
            "mask_ms_p95": _percentile(rest, 0.95),
            "fill_ms_p50": statistics.median(s * 1e3 for s in matcher.fill_s[1:] or matcher.fill_s),
            "accept_ms_p50": statistics.median(s * 1e3 for s in matcher.accept_s) if matcher.accept_s else None,
            "decode_ms_per_token": _decode_ms_per_token(seq),
            "finish_reason": str(seq.finish_reason),
            "valid_json": valid,
            "output": text[:200],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    from model.bundled import default_checkpoint
    from model.checkpoint import load_model
    from model.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the embedded model")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.checkpoint or default_checkpoint()
    model = load_model(path, dtype=torch.float32, device="cpu")
    result = measure(model, load_tokenizer(path), max_tokens=args.max_tokens)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
