"""What this machine allows: measured memory read bandwidth and matmul FLOP/s, and the token rates they bound.

One decode stream reads every weight once per token, so it cannot beat bandwidth / weight bytes. A large
batch amortises the weight reads and becomes compute-bound: each token costs about 2 FLOPs per parameter
(one multiply-add per weight; attention over a short context is small next to it and is left out).
Tied embeddings count once: the lookup reads one row, the output projection reads the whole matrix.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from model.config import ModelConfig
from model.device import DTYPES

# Weight bytes per parameter of the weight-only quant modes (model/quant.py): int8 with a bf16 scale per row;
# int4 with a bf16 scale and zero per 32 weights (5 bits a weight), its output projection in int8.
QUANT_BITS = {"int8": 8.0, "int4": 5.0}


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults, kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s that a `sum` over an fp32 tensor of `nbytes` reads (best of `repeats`); far larger than the
    caches, so it measures DRAM."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    seconds = _best_time(lambda: x.sum(), repeats)
    return x.numel() * 4 / seconds


def measure_matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an (n, n) @ (n, n) `torch.mm` in `dtype` (best of `repeats`)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    seconds = _best_time(lambda: torch.mm(a, b, out=out), repeats)
    return 2.0 * n**3 / seconds


def weight_bytes_per_token(config: ModelConfig, bytes_per_param: float) -> float:
    """Bytes of weights one decode step reads; `num_params()` counts a tied embedding once."""
    return config.num_params() * bytes_per_param


def quant_weight_bytes_per_token(config: ModelConfig, mode: str) -> float:
    """Bytes of weights one decode step reads in a quant mode; the tied output projection is its own int8 copy,
    the embedding lookup reads one row (left out)."""
    output = config.vocab_size * config.n_embd
    layers = config.num_params() - output
    return layers * QUANT_BITS[mode] / 8 + output * 1.0


def single_stream_tokens_per_s(bandwidth: float, weight_bytes: float) -> float:
    """Upper bound for one stream: every weight byte is read once per token."""
    if weight_bytes <= 0:
        raise ValueError(f"weight_bytes must be positive, got {weight_bytes}")
    return bandwidth / weight_bytes


def batch_tokens_per_s(flops: float, n_params: int) -> float:
    """Upper bound for a compute-bound batch: 2 FLOPs per parameter per token."""
    if n_params <= 0:
        raise ValueError(f"n_params must be positive, got {n_params}")
    return flops / (2.0 * n_params)


@dataclass
class Ceiling:
    bandwidth_gbs: float
    threads: int
    params: int
    matmul_gflops: dict[str, float]  # by dtype name
    single_stream_tokens_per_s: dict[str, float]  # by dtype name, and "gguf" for llama.cpp's file
    batch_tokens_per_s: dict[str, float]  # by dtype name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_ceiling(
    config: ModelConfig,
    dtypes: list[str],
    quick: bool = False,
    gguf_bytes: int | None = None,
    quants: list[str] = (),
) -> Ceiling:
    """Measure this machine and derive the ceilings for `config` in each dtype. `gguf_bytes` (the GGUF file's
    size, close to its quantised weights' bytes) adds llama.cpp's single-stream bound; `quants` (int8, int4) add
    theirs."""
    bandwidth = measure_read_bandwidth(nbytes=(256 << 20) if quick else (1 << 30), repeats=3 if quick else 5)
    n = 1024 if quick else 2048
    params = config.num_params()
    gflops, single, batch = {}, {}, {}
    for name in dtypes:
        dtype = DTYPES[name]
        flops = measure_matmul_flops(dtype, n=n, repeats=3 if quick else 5)
        gflops[name] = flops / 1e9
        single[name] = single_stream_tokens_per_s(bandwidth, weight_bytes_per_token(config, dtype.itemsize))
        batch[name] = batch_tokens_per_s(flops, params)
    for mode in quants:
        if mode in QUANT_BITS:
            single[mode] = single_stream_tokens_per_s(bandwidth, quant_weight_bytes_per_token(config, mode))
    if gguf_bytes:
        single["gguf"] = single_stream_tokens_per_s(bandwidth, gguf_bytes)
    return Ceiling(
        bandwidth_gbs=bandwidth / 1e9,
        threads=torch.get_num_threads(),
        params=params,
        matmul_gflops=gflops,
        single_stream_tokens_per_s=single,
        batch_tokens_per_s=batch,
    )
