"""Training speed: tokens/s and MFU of our trainer's optimizer step next to the same step of
`transformers.LlamaForCausalLM`.

Both sides run the trainer's own code: ours is `trainer.loop.measure_throughput` (our `Transformer`, fp32
master weights, bf16 autocast when asked, fused AdamW with decay on matrices only, gradient clipping, random
token windows); the transformers side runs the same `trainer.loop.train_step`, optimizer builder and sampler
on `LlamaForCausalLM` built from the same config. So the ratio isolates the model implementation.

MFU = the trainer's FLOPs per token (6 N + 12 L H Q T) x tokens/s / this machine's measured matmul FLOP/s in
the compute dtype (measured, not a datasheet figure: "share of what torch.mm reaches here").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.ceiling import measure_matmul_flops
from model.device import DTYPES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainCase:
    """One benchmarked shape: a model preset trained from scratch with `batch_size` x `seq_len` tokens per step."""

    preset: str
    batch_size: int
    seq_len: int
    dtype: str = "bfloat16"  # the trainer's `dtype`: fp32 weights, bf16 autocast when "bfloat16"
    steps: int = 3
    warmup: int = 1


def train_config(case: TrainCase):
    """The trainer's config for `case` (validated by the trainer; errors name the key)."""
    from trainer.config import build_config

    return build_config(
        {
            "model": case.preset,
            "init_from": "scratch",
            "tokenizer": "bundled",
            "data": {"seq_len": case.seq_len},
            "batch_size": case.batch_size,
            "dtype": case.dtype,
            "device": "cpu",
            "plot": False,
        }
    )


class LogitsOnly(nn.Module):
    """`LlamaForCausalLM` behind our model's interface: ids (B, T) -> fp32 logits (B, T, vocab)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits.float()


def ours_tokens_per_s(case: TrainCase) -> float:
    from trainer.loop import measure_throughput

    return measure_throughput(train_config(case), steps=case.steps, warmup=case.warmup)


def transformers_tokens_per_s(case: TrainCase) -> float:
    """The trainer's `train_step` on `LlamaForCausalLM`, timed exactly as `measure_throughput` times ours."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.data import WindowSampler
    from trainer.init_source import resolve_model_source
    from trainer.loop import autocast_context, train_step
    from trainer.optim import build_optimizer, set_lr

    cfg = train_config(case)
    config = resolve_model_source(cfg).config
    hf_config = LlamaConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    model = LogitsOnly(LlamaForCausalLM(hf_config)).train()  # fp32 master weights, as ours
    device = torch.device("cpu")
    optimizer = build_optimizer(model, cfg.optim, device)
    rng = np.random.default_rng(cfg.seed)
    tokens = rng.integers(0, config.vocab_size, size=cfg.batch_size * (cfg.data.seq_len + 1) * 4)
    sampler = WindowSampler(tokens.astype(np.int64), cfg.data.seq_len, cfg.batch_size, cfg.seed)
    autocast = autocast_context(cfg, device)
    set_lr(optimizer, cfg.optim.lr)
    for _ in range(case.warmup):
        train_step(model, optimizer, sampler, cfg.grad_accum, cfg.grad_clip, device, autocast)
    t0 = time.perf_counter()
    for _ in range(case.steps):
        loss, _ = train_step(model, optimizer, sampler, cfg.grad_accum, cfg.grad_clip, device, autocast)
    loss.item()  # host sync, as in measure_throughput
    return cfg.tokens_per_step * case.steps / (time.perf_counter() - t0)


def bench_case(case: TrainCase, peak_flops: float) -> dict[str, Any]:
    from trainer.init_source import resolve_model_source
    from trainer.mfu import flops_per_token

    model_config = resolve_model_source(train_config(case)).config
    per_token = flops_per_token(model_config, case.seq_len)
    out: dict[str, Any] = {
        "batch_size": case.batch_size,
        "seq_len": case.seq_len,
        "dtype": case.dtype,
        "params": model_config.num_params(),
        "steps": case.steps,
        "peak_gflops": peak_flops / 1e9,
    }
    for name, measure in (("ours", ours_tokens_per_s), ("transformers", transformers_tokens_per_s)):
        tps = measure(case)
        out[name] = {"tokens_per_s": tps, "mfu_pct": 100 * per_token * tps / peak_flops}
        log.info("training %s %s: %.0f tok/s", case.preset, name, tps)
    return out


def default_cases(quick: bool) -> list[TrainCase]:
    # tiny in fp32 as trainer/configs/tiny.yaml, 135M in bf16 autocast as trainer/configs/smollm2-135m.yaml;
    # shapes small enough for a 2-core CPU to take a few seconds a step.
    cases = [TrainCase("tiny", 8, 256, dtype="float32", steps=2 if quick else 5)]
    if not quick:
        cases.append(TrainCase("smollm2-135m", 4, 256, dtype="bfloat16", steps=3))
    return cases


def run_training(
    quick: bool = False,
    peak_flops: dict[str, float] | None = None,
    cases: list[TrainCase] | None = None,
) -> dict[str, Any]:
    """Both implementations on each case; `peak_flops` by dtype name (measured here where missing)."""
    peaks = dict(peak_flops or {})
    runs = {}
    for case in cases or default_cases(quick):
        if case.dtype not in peaks:
            peaks[case.dtype] = measure_matmul_flops(DTYPES[case.dtype], n=1024 if quick else 2048)
        runs[f"{case.preset} {case.dtype}"] = bench_case(case, peaks[case.dtype])
    return {
        "ours_impl": "trainer.loop.measure_throughput (model.llama.Transformer)",
        "anchor_impl": "trainer.loop.train_step on transformers.LlamaForCausalLM (sdpa)",
        "runs": runs,
    }
