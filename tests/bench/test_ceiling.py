from __future__ import annotations

import pytest
import torch

from bench.ceiling import (
    batch_tokens_per_s,
    measure_ceiling,
    measure_matmul_flops,
    measure_read_bandwidth,
    single_stream_tokens_per_s,
    weight_bytes_per_token,
)
from model.config import ModelConfig


def test_weights_read_per_token_count_the_tied_embedding_once():
    c = ModelConfig.from_name("smollm2-135m")
    per_layer = 576 * 64 * (9 + 2 * 3) + 9 * 64 * 576 + 3 * 576 * 1536 + 2 * 576
    params = 30 * per_layer + 576 + 49152 * 576  # final norm, and embedding == lm_head
    assert c.num_params() == params == 134_515_008
    assert weight_bytes_per_token(c, 2) == 2 * params
    assert weight_bytes_per_token(c.replace(tie_embeddings=False), 4) == 4 * (params + 49152 * 576)


def test_ceiling_math():
    c = ModelConfig.from_name("smollm2-135m")
    # 20 GB/s over 269 MB of bf16 weights: 74 tokens/s for one stream.
    assert single_stream_tokens_per_s(20e9, weight_bytes_per_token(c, 2)) == pytest.approx(74.34, rel=1e-3)
    # 1 TFLOP/s at 2 FLOPs per parameter per token: 3717 tokens/s for a large batch.
    assert batch_tokens_per_s(1e12, c.num_params()) == pytest.approx(3717.1, rel=1e-3)
    with pytest.raises(ValueError, match="weight_bytes"):
        single_stream_tokens_per_s(1e9, 0)
    with pytest.raises(ValueError, match="n_params"):
        batch_tokens_per_s(1e9, 0)


def test_measurements_are_plausible():
    bw = measure_read_bandwidth(nbytes=32 << 20, repeats=2)
    assert 1e8 < bw < 1e13  # 0.1 GB/s .. 10 TB/s
    flops = measure_matmul_flops(torch.float32, n=256, repeats=2)
    assert 1e8 < flops < 1e15


def test_measure_ceiling_ties_the_parts_together():
    c = ModelConfig.from_name("tiny")
    ceil = measure_ceiling(c, ["float32", "bfloat16"], quick=True, gguf_bytes=1_000_000).to_dict()
    bw = ceil["bandwidth_gbs"] * 1e9
    assert ceil["params"] == c.num_params()
    assert ceil["single_stream_tokens_per_s"]["float32"] == pytest.approx(bw / (4 * c.num_params()))
    assert ceil["single_stream_tokens_per_s"]["bfloat16"] == pytest.approx(bw / (2 * c.num_params()))
    assert ceil["single_stream_tokens_per_s"]["gguf"] == pytest.approx(bw / 1_000_000)
    for d in ("float32", "bfloat16"):
        assert ceil["batch_tokens_per_s"][d] == pytest.approx(ceil["matmul_gflops"][d] * 1e9 / (2 * c.num_params()))


def test_quant_modes_read_fewer_weight_bytes():
    from bench.ceiling import quant_weight_bytes_per_token

    c = ModelConfig.from_name("smollm2-135m")
    output = 49152 * 576  # the tied output projection's own int8 copy, in both modes
    assert quant_weight_bytes_per_token(c, "int8") == c.num_params()
    assert quant_weight_bytes_per_token(c, "int4") == (c.num_params() - output) * 5 / 8 + output
    ceil = measure_ceiling(ModelConfig.from_name("tiny"), ["float32"], quick=True, quants=["none", "int4"]).to_dict()
    assert set(ceil["single_stream_tokens_per_s"]) == {"float32", "int4"}
