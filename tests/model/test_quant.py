"""Weight-only int8/int4 layers: they load, stay close to fp32, and give the same tokens alone and in a batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.config import ModelConfig
from model.kv_cache import CacheBatch
from model.llama import Transformer
from model.packed_linear import pack_linears
from model.quant import QUANT_MODES, Int4Linear, Int8Linear, kernel_dtype, quantize_model

CONFIG = ModelConfig.from_name("tiny")
N_LINEARS = 4 * CONFIG.n_layer + 1  # wqkv, wo, w13, w2 per layer, and the output projection


def tiny() -> Transformer:
    model = Transformer(CONFIG)
    model.init_weights(seed=0)
    return model.eval()


def quantized(mode: str) -> Transformer:
    model = tiny()
    assert quantize_model(model, mode) == (0 if mode == "none" else N_LINEARS)
    return model


def decode(model: Transformer, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill `prompt` (B, T), then `steps` greedy steps through the KV cache: tokens (B, steps + 1) and the
    logits of every step (B, steps + 1, vocab)."""
    B, T = prompt.shape
    cache = model.new_kv_cache(max_slots=B, max_len=64)
    slots = list(range(B))
    logits = [model(prompt, batch=CacheBatch.build(cache, slots, torch.arange(T).expand(B, T)))[:, -1]]
    tokens = [logits[-1].argmax(-1)]
    for i in range(steps):
        step = CacheBatch.build(cache, slots, torch.full((B, 1), T + i))
        logits.append(model(tokens[-1][:, None], batch=step)[:, -1])
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def test_modes_replace_every_linear_and_keep_the_embedding():
    for mode, cls in (("int8", Int8Linear), ("int4", Int4Linear)):
        model = quantized(mode)
        assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        layers = [
            model.layers[0].attention.wqkv,
            model.layers[0].attention.wo,
            model.layers[0].feed_forward.w13,
            model.layers[0].feed_forward.w2,
        ]
        assert all(isinstance(m, cls) for m in layers)
        # The tied output projection is its own (int8) copy; the embedding table stays in the compute dtype.
        assert isinstance(model.output, Int8Linear)
        assert model.tok_embeddings.weight.dtype == torch.float32
        assert torch.equal(model.tok_embeddings.weight, tiny().tok_embeddings.weight)
    plain = quantized("none")
    assert isinstance(plain.output, nn.Linear)


@pytest.mark.parametrize("mode, tolerance", [("int8", 0.03), ("int4", 0.15)])
@torch.inference_mode()
def test_forward_stays_close_to_fp32(mode, tolerance):
    prompt = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = tiny()(prompt)
    out = quantized(mode)(prompt)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < tolerance, rel


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.inference_mode()
def test_greedy_tokens_are_the_same_alone_and_in_a_batch(mode):
    model = quantized(mode)
    gen = torch.Generator().manual_seed(2)
    batch = torch.randint(0, CONFIG.vocab_size, (4, 9), generator=gen)
    alone_tokens, alone_logits = decode(model, batch[:1], 8)
    batch_tokens, batch_logits = decode(model, batch, 8)
    assert torch.equal(alone_tokens[0], batch_tokens[0])
    assert torch.equal(alone_logits[0], batch_logits[0])  # row-wise kernels: bit-identical, not just close


def test_int8_layer_error_is_within_half_a_step():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    layer = Int8Linear(w, torch.bfloat16)
    amax = w.abs().amax(1, keepdim=True)
    # bf16 scales (the kernel's activation dtype) round by up to 2^-9 of their value on top of the half step.
    assert ((layer.dequantize() - w).abs() <= amax / 127 * 0.5 + amax * 2**-8).all()


def test_int4_layer_error_is_within_half_a_step_per_group():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(4))
    layer = Int4Linear(w, torch.bfloat16)
    groups = w.view(48, 2, 32)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, dim=1)
    # bf16 scales and zeros round by up to 2^-9 of their value on top of the half step.
    bound = step * 0.5 + groups.abs().amax(-1).repeat_interleave(32, dim=1) * 2**-7
    assert ((layer.dequantize() - w).abs() <= bound).all()


def test_int4_reproduces_weights_already_on_a_q4_1_grid():
    # A Q4_1 block: q in 0..15 with every value used, scale and minimum exact in bf16 (as the embedded GGUF's
    # blocks all span 0..15, requantizing them must give the same weights back).
    gen = torch.Generator().manual_seed(5)
    q = torch.stack([torch.randperm(32, generator=gen) % 16 for _ in range(16 * 4)]).view(16, 128).float()
    scale, lo = 2.0**-5, -0.25
    w = q * scale + lo
    assert torch.equal(Int4Linear(w, torch.bfloat16).dequantize(), w)


def test_quantized_linear_keeps_leading_dims_and_input_dtype():
    w = torch.randn(32, 64)
    x = torch.randn(2, 3, 64)
    for layer in (Int8Linear(w, torch.bfloat16), Int4Linear(w, torch.bfloat16)):
        y = layer(x)
        assert y.shape == (2, 3, 32) and y.dtype == torch.float32
        # What the kernel computes is the dequantized weight times the activations rounded to bf16.
        exact = x.bfloat16().float() @ layer.dequantize().t()
        assert ((y - exact).norm() / exact.norm()).item() < 1e-2


def test_kernel_dtype_feeds_bf16_to_the_kernels_for_fp32_models():
    assert kernel_dtype(torch.float32) == torch.bfloat16
    assert kernel_dtype(torch.bfloat16) == torch.bfloat16
    assert kernel_dtype(torch.float16) == torch.float16


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="quant: expected one of none, int8, int4, got 'int3'"):
        quantize_model(tiny(), "int3")
    assert set(QUANT_MODES) == {"none", "int8", "int4"}
    packed = tiny()
    if pack_linears(packed):
        with pytest.raises(TypeError, match="quantize before packing"):
            quantize_model(packed, "int8")
    with pytest.raises(ValueError, match="out_features 8 is not a multiple of 16"):
        Int4Linear(torch.randn(8, 64), torch.bfloat16)
    with pytest.raises(ValueError, match="group size 48"):
        Int4Linear(torch.randn(8, 64), torch.bfloat16, group_size=48)
    meta = Transformer(CONFIG).to("meta")
    with pytest.raises(ValueError, match="CPU kernels; the model is on meta"):
        quantize_model(meta, "int4")


@torch.inference_mode()
def test_a_bf16_model_keeps_bf16_activations():
    model = tiny().to(torch.bfloat16)
    ref = model(torch.arange(8)[None]).float()
    quantize_model(model, "int4")
    assert model.layers[0].feed_forward.w13.scales_and_zeros.dtype == torch.bfloat16
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    out = model(torch.arange(8)[None])
    assert out.dtype == torch.float32  # the model's logits contract, whatever the weights
    assert ((out - ref).norm() / ref.norm()).item() < 0.15
