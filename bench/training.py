"""Training speed and memory: tokens/s, MFU and peak memory of our trainer's optimizer step, plain and with each
of its memory/speed options (`compile`, `activation_checkpointing`, `loss_chunk_tokens`), next to the same step of
`transformers.LlamaForCausalLM`.

Both sides run the trainer's own code: `trainer.loop.train_step` with the trainer's optimizer builder (fp32 master
weights, bf16 autocast when asked, fused AdamW with decay on matrices only, gradient clipping) on random token
windows. Ours is `trainer.init_source.build_model` after `trainer.loop.prepare_model` (which applies the options, in
the trainer's order); the anchor is `LlamaForCausalLM` built from the same config. So the ratio isolates the model
implementation, and each option's row shows what the option costs or buys.

Each configuration runs in a fresh subprocess (`python -m bench.training --worker ...`), so that its memory
figures are its own: `peak_rss_mib` is the process's peak resident memory while it trained (VmHWM, reset after the
model and optimizer were built), `train_mib` what the training steps added on top of the built model (gradients,
optimizer state, activations, logits); on CUDA, `cuda_peak_mib` is torch's peak allocated memory.

MFU = the trainer's FLOPs per token (6 N + 12 L H Q T) x tokens/s / this machine's measured matmul FLOP/s in
the compute dtype (measured, not a datasheet figure: "share of what torch.mm reaches here").
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.ceiling import measure_matmul_flops
from model.device import DTYPES

log = logging.getLogger(__name__)

# Our trainer's options, each measured as its own row: the TrainConfig fields it sets.
VARIANTS: dict[str, dict[str, Any]] = {
    "compile": {"compile": True},
    "activation_checkpointing": {"activation_checkpointing": True},
    "loss_chunk_tokens=512": {"loss_chunk_tokens": 512},
}
WORKER_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class TrainCase:
    """One benchmarked shape: a model preset trained from scratch with `batch_size` x `seq_len` tokens per step;
    `variants` (names in VARIANTS) add rows of ours with that trainer option on."""

    preset: str
    batch_size: int
    seq_len: int
    dtype: str = "bfloat16"  # the trainer's `dtype`: fp32 weights, bf16 autocast when "bfloat16"
    steps: int = 3
    warmup: int = 1
    variants: tuple[str, ...] = ()
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")


def train_config(case: TrainCase, **overrides: Any):
    """The trainer's config for `case` with top-level `overrides` (validated by the trainer; errors name the key)."""
    from trainer.config import build_config

    return build_config(
        {
            "model": case.preset,
            "init_from": "scratch",
            "tokenizer": "bundled",
            "data": {"seq_len": case.seq_len},
            "batch_size": case.batch_size,
            "dtype": case.dtype,
            "device": case.device,
            "plot": False,
            **overrides,
        }
    )


class LogitsOnly(nn.Module):
    """`LlamaForCausalLM` behind our model's interface: ids (B, T) -> fp32 logits (B, T, vocab)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits.float()


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: `5` into /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _build(case: TrainCase, impl: str, variant: str | None):
    from trainer.init_source import build_model, resolve_model_source
    from trainer.loop import prepare_model

    cfg = train_config(case, **(VARIANTS[variant] if variant else {}))
    config = resolve_model_source(cfg).config
    torch.manual_seed(cfg.seed)
    if impl == "ours":
        model = prepare_model(build_model(resolve_model_source(cfg), cfg.seed), cfg)
    elif impl == "transformers":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_config = LlamaConfig(**config.to_hf_dict())
        hf_config._attn_implementation = "sdpa"
        model = LogitsOnly(LlamaForCausalLM(hf_config))  # fp32 master weights, as ours
    else:
        raise ValueError(f"impl: expected ours or transformers, got {impl!r}")
    return cfg, config, model


def measure(case: TrainCase, impl: str, variant: str | None = None) -> dict[str, Any]:
    """Tokens/s and memory of `case.steps` timed train steps (after `case.warmup`) of `impl` ("ours" with the
    trainer option `variant`, or "transformers"), in this process: run it in a fresh one (`measure_isolated`)
    for memory figures that are its own."""
    from trainer.data import WindowSampler
    from trainer.loop import autocast_context, train_step
    from trainer.optim import build_optimizer, set_lr

    cfg, config, model = _build(case, impl, variant)
    device = torch.device(case.device)
    model = model.to(device).train()
    optimizer = build_optimizer(model, cfg.optim, device)
    rng = np.random.default_rng(cfg.seed)
    tokens = rng.integers(0, config.vocab_size, size=cfg.batch_size * (cfg.data.seq_len + 1) * 4)
    sampler = WindowSampler(tokens.astype(np.int64), cfg.data.seq_len, cfg.batch_size, cfg.seed)
    autocast = autocast_context(cfg, device)
    set_lr(optimizer, cfg.optim.lr)

    def step() -> torch.Tensor:
        loss, _ = train_step(
            model,
            optimizer,
            sampler,
            cfg.grad_accum,
            cfg.grad_clip,
            device,
            autocast,
            loss_chunk_tokens=cfg.loss_chunk_tokens,
        )
        return loss

    rss_before = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(case.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(case.steps):
        loss = step()
    loss.item()  # host sync: wait for the queued work before stopping the clock
    tps = cfg.tokens_per_step * case.steps / (time.perf_counter() - t0)
    peak = _proc_status_kib("VmHWM")
    out: dict[str, Any] = {"tokens_per_s": tps, "peak_rss_mib": None if peak is None else peak / 1024}
    # Without the reset, VmHWM covers the process's whole life; the figure is then an upper bound.
    out["train_mib"] = (peak - rss_before) / 1024 if reset and peak is not None and rss_before is not None else None
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def measure_isolated(case: TrainCase, impl: str, variant: str | None = None) -> dict[str, Any]:
    """`measure` in a fresh `python -m bench.training --worker` subprocess; its figures as a dict."""
    job = json.dumps({"case": asdict(case), "impl": impl, "variant": variant})
    cmd = [sys.executable, "-m", "bench.training", "--worker", job]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"training measurement {impl} {variant or ''} exited {done.returncode}:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_case(case: TrainCase, peak_flops: float) -> dict[str, Any]:
    from trainer.init_source import resolve_model_source
    from trainer.mfu import flops_per_token

    # In this process first: a bad case fails here with the trainer's error naming the key.
    model_config = resolve_model_source(train_config(case)).config
    for variant in case.variants:
        train_config(case, **VARIANTS[variant])
    per_token = flops_per_token(model_config, case.seq_len)
    out: dict[str, Any] = {
        "batch_size": case.batch_size,
        "seq_len": case.seq_len,
        "dtype": case.dtype,
        "params": model_config.num_params(),
        "steps": case.steps,
        "peak_gflops": peak_flops / 1e9,
    }

    def row(impl: str, variant: str | None = None) -> dict[str, Any]:
        r = measure_isolated(case, impl, variant)
        r["mfu_pct"] = 100 * per_token * r["tokens_per_s"] / peak_flops
        log.info(
            "training %s %s%s: %.0f tok/s, peak RSS %.0f MiB",
            case.preset,
            impl,
            f" +{variant}" if variant else "",
            r["tokens_per_s"],
            r["peak_rss_mib"] or 0,
        )
        return r

    out["ours"] = row("ours")
    out["transformers"] = row("transformers")
    if case.variants:
        out["ours_variants"] = {v: row("ours", v) for v in case.variants}
    return out


def default_cases(quick: bool) -> list[TrainCase]:
    # tiny in fp32 as trainer/configs/tiny.yaml, 135M in bf16 autocast as trainer/configs/smollm2-135m.yaml;
    # shapes small enough for a 2-core CPU to take a few seconds a step.
    # The trainer's options are measured on the tiny fp32 case: a few minutes on 2 cores in all (compile included).
    cases = [TrainCase("tiny", 8, 256, dtype="float32", steps=2 if quick else 5, variants=tuple(VARIANTS))]
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
        "ours_impl": "trainer.loop.train_step on model.llama.Transformer (trainer.loop.prepare_model for the options)",
        "anchor_impl": "trainer.loop.train_step on transformers.LlamaForCausalLM (sdpa)",
        "runs": runs,
    }


def _worker(job: str) -> None:
    spec = json.loads(job)
    case = TrainCase(**{**spec["case"], "variants": tuple(spec["case"]["variants"])})
    sys.stdout.write(json.dumps(measure(case, spec["impl"], spec["variant"])) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.training", description="one training measurement")
    parser.add_argument("--worker", required=True, help="JSON: case, impl, variant (used by measure_isolated)")
    _worker(parser.parse_args().worker)
