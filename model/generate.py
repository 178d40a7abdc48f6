"""Single-sequence generation on the KV cache, and the `python -m model.generate` CLI that streams tokens.

The work is split the way the hardware sees it: `prefill` (the prompt, one batched pass) and
`decode_one_token` (one position). The service's engine batches many sequences on the same forward pass.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence

import torch

from model.kv_cache import CacheBatch, KVCache
from model.llama import Transformer
from model.sampling import SamplingParams, sample


def prefill(model: Transformer, cache: KVCache, slot: int, prompt_ids: Sequence[int]) -> torch.Tensor:
    """Run the prompt into `slot` of the cache; logits (1, vocab) of its last position."""
    T = len(prompt_ids)
    idx = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
    batch = CacheBatch.build(cache, [slot], [range(T)], logits_index=[T - 1])
    return model(idx, batch=batch)


def decode_one_token(model: Transformer, cache: KVCache, slot: int, token: int, position: int) -> torch.Tensor:
    """Feed one token at `position`; logits (1, vocab) for the next."""
    idx = torch.tensor([[token]], dtype=torch.long, device=model.device)
    return model(idx, batch=CacheBatch.build(cache, [slot], [[position]]))[:, -1]


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(temperature=0.0),
    stop_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield up to `max_new_tokens` generated ids, stopping after a token in `stop_ids`."""
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    total = len(prompt_ids) + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(
            f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"context length {model.config.block_size}"
        )
    cache = model.new_kv_cache(max_slots=1, max_len=total)
    generator = params.make_generator()
    logits = prefill(model, cache, 0, prompt_ids)
    position = len(prompt_ids)
    for _ in range(max_new_tokens):
        token = int(sample(logits, [params], [generator])[0])  # host sync: the CLI needs the id to print it
        yield token
        if token in stop_ids:
            return
        logits = decode_one_token(model, cache, 0, token, position)
        position += 1


def main(argv: list[str] | None = None) -> int:
    from model.bundled import default_checkpoint
    from model.checkpoint import CheckpointError, load_model
    from model.device import DTYPES
    from model.packed_linear import pack_linears
    from model.tokenizer import IncrementalDecoder, load_tokenizer

    parser = argparse.ArgumentParser(prog="python -m model.generate", description="Stream a completion to stdout.")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")
    try:
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        parser.error(str(e))
    try:
        path = args.checkpoint or default_checkpoint()
        model = load_model(path, dtype=DTYPES[args.dtype])
        pack_linears(model)
        tokenizer = load_tokenizer(path)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.chat:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    else:
        prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False)
    stop_ids = {model.config.eos_token_id}
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    decoder = IncrementalDecoder(tokenizer)
    try:
        for token in generate_tokens(model, prompt_ids, args.max_tokens, params, tuple(stop_ids)):
            sys.stdout.write(decoder.step(token))
            sys.stdout.flush()
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
