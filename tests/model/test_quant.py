"""Weight-only int8/int4 layers: they load, stay close to fp32, and give the same tokens alone and in a batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import native
from model.config import ModelConfig
from model.device import CpuCapability
from model.kv_cache import CacheBatch
from model.llama import Transformer
from model.native import native_kernels
from model.packed_linear import pack_linears
from model.quant import (
    FBGEMM_BOUND,
    INT4_KERNELS,
    INT8_KERNELS,
    QUANT_MODES,
    Int4Linear,
    Int8Linear,
    NonFiniteWeightsError,
    kernel_dtype,
    linear_kernels,
    pick_int8_kernel,
    quantize_model,
)

CONFIG = ModelConfig.from_name("tiny")
N_LINEARS = 4 * CONFIG.n_layer + 1  # wqkv, wo, w13, w2 per layer, and the output projection


def tiny() -> Transformer:
    model = Transformer(CONFIG)
    model.init_weights(seed=0)
    return model.eval()


AVX2 = CpuCapability(isa="AVX2", native_bf16=False)
AMX = CpuCapability(isa="AVX512", native_bf16=True)
HAS_FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines
needs_fbgemm = pytest.mark.skipif(not HAS_FBGEMM, reason="this torch has no fbgemm")


HAS_NATIVE = native_kernels() is not None


def quantized(mode: str, int8_kernel: str | None = None, int4_kernel: str | None = None) -> Transformer:
    model = tiny()
    count = quantize_model(model, mode, int8_kernel=int8_kernel, int4_kernel=int4_kernel)
    assert count == (0 if mode == "none" else N_LINEARS)
    return model


def kernels() -> list[str]:
    return [k for k in INT8_KERNELS if k != "fbgemm" or HAS_FBGEMM]


# (mode, int8 kernel, int4 kernel) for every kernel this machine runs.
KERNEL_CASES = [("int8", k, None) for k in kernels()] + [
    ("int4", None, k) for k in INT4_KERNELS if k != "native" or HAS_NATIVE
]


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


@pytest.mark.parametrize("mode, int8_kernel, int4_kernel", KERNEL_CASES)
@torch.inference_mode()
def test_forward_stays_close_to_fp32(mode, int8_kernel, int4_kernel):
    tolerance = {"int8": 0.03, "int4": 0.15}[mode]
    prompt = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = tiny()(prompt)
    out = quantized(mode, int8_kernel, int4_kernel)(prompt)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < tolerance, rel


@pytest.mark.parametrize("mode, int8_kernel, int4_kernel", KERNEL_CASES)
@torch.inference_mode()
def test_greedy_tokens_are_the_same_alone_and_in_a_batch(mode, int8_kernel, int4_kernel):
    model = quantized(mode, int8_kernel, int4_kernel)
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
    if HAS_FBGEMM:
        layer = Int8Linear(w, torch.bfloat16, "fbgemm")
        for inp in (x, x.bfloat16()):
            y = layer(inp)
            assert y.shape == (2, 3, 32) and y.dtype == inp.dtype


def test_kernel_dtype_feeds_bf16_to_the_kernels_for_fp32_models():
    assert kernel_dtype(torch.float32) == torch.bfloat16
    assert kernel_dtype(torch.bfloat16) == torch.bfloat16
    assert kernel_dtype(torch.float16) == torch.float16


def test_non_finite_weights_are_refused_before_quantizing():
    for mode in ("int8", "int4"):
        model = tiny()
        with torch.no_grad():
            model.layers[1].feed_forward.w2.weight[3, 5] = float("nan")
            model.layers[0].attention.wqkv.weight[0, 0] = float("inf")
        with pytest.raises(NonFiniteWeightsError) as refused:
            quantize_model(model, mode)
        assert refused.value.names == ["layers.0.attention.wqkv.weight", "layers.1.feed_forward.w2.weight"]
        assert "non-finite weights in layers.0.attention.wqkv.weight" in str(refused.value)
        assert isinstance(model.layers[1].feed_forward.w2, nn.Linear)  # nothing replaced


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="quant: expected one of none, int8, int4, got 'int3'"):
        quantize_model(tiny(), "int3")
    assert set(QUANT_MODES) == {"none", "int8", "int4"}
    packed = tiny()
    if pack_linears(packed):
        with pytest.raises(TypeError, match="quantize before packing"):
            quantize_model(packed, "int8")
    own_bf16 = tiny().to(torch.bfloat16)
    if native.bf16_isa() is not None and pack_linears(own_bf16):  # the bf16 kernel's layers are packed too
        with pytest.raises(TypeError, match="quantize before packing"):
            quantize_model(own_bf16, "int8")
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
    quantize_model(model, "int4", int4_kernel="aten")
    assert model.layers[0].feed_forward.w13.scales_and_zeros.dtype == torch.bfloat16
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    out = model(torch.arange(8)[None])
    assert out.dtype == torch.float32  # the model's logits contract, whatever the weights
    assert ((out - ref).norm() / ref.norm()).item() < 0.15


@needs_fbgemm
@torch.inference_mode()
def test_fbgemm_int8_computes_the_dequantized_weight_at_fp32_precision():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(48, 96, generator=gen)
    layer = Int8Linear(w, torch.bfloat16, "fbgemm")
    # The same int8 weights and scales as the aten kernel's (what is stored, and what fbgemm packed).
    assert torch.equal(layer.qweight, Int8Linear(w, torch.bfloat16, "aten").qweight)
    assert layer.scales.dtype == torch.float32
    packed_q = torch.ops.quantized.linear_unpack(layer.packed)[0]
    assert torch.equal(packed_q.int_repr()[:, :96], layer.qweight)
    assert not packed_q.int_repr()[:, 96:].any()  # the bound columns meet zero weights
    x = torch.randn(5, 96, generator=gen) * torch.logspace(-2, 1, 96)  # outlier channels, as real activations
    exact = x @ layer.dequantize().t()
    y = layer(x)
    # Two passes of 7 bits: the activations' rounding is ~1e-4 of a row's max, far below bf16's 4e-3.
    assert ((y - exact).norm() / exact.norm()).item() < 1e-3
    bf16 = x.bfloat16().float() @ layer.dequantize().t()
    assert (y - exact).norm() < (bf16 - exact).norm()


@needs_fbgemm
@torch.inference_mode()
def test_fbgemm_rows_do_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(7)
    layer = Int8Linear(torch.randn(32, 64, generator=gen), torch.float32, "fbgemm")
    x = torch.randn(6, 64, generator=gen)
    x[2] *= 1000.0  # one row far larger than the others: a shared activation scale would crush them
    x[4] = 0.0  # an all-zero row (padding) stays zero, not NaN
    batched = layer(x)
    for r in range(6):
        assert torch.equal(batched[r], layer(x[r : r + 1])[0])
    assert torch.equal(batched[4], torch.zeros(32))
    # Rows at the bound's edge (every element +-max) must not push the input past it.
    edge = torch.tensor([[1.0, -1.0] * 32, [3.0] * 64])
    assert torch.equal(layer(edge)[0], layer(torch.cat([edge[:1], x]))[0])
    assert FBGEMM_BOUND == 63.5


@needs_fbgemm
def test_int8_layers_run_fbgemm_on_both_kinds_of_cpu():
    """fbgemm wherever torch has it: measured faster than aten's kernel on AVX2 and on AMX alike (model/quant.py)."""
    assert pick_int8_kernel() == "fbgemm"
    for capability in (AVX2, AMX):
        for mode in ("int8", "int4"):
            model = tiny()
            quantize_model(model, mode, capability=lambda capability=capability: capability)
            assert model.output.kernel == "fbgemm"


def test_int8_kernel_falls_back_to_aten_without_fbgemm(monkeypatch):
    import model.quant

    monkeypatch.setattr(model.quant, "fbgemm_available", lambda: False)
    assert pick_int8_kernel() == "aten"
    model = tiny()
    quantize_model(model, "int8", capability=lambda: AVX2)
    assert {m.kernel for m in model.modules() if isinstance(m, Int8Linear)} == {"aten"}
    with pytest.raises(ValueError, match="int8 kernel: expected one of aten, fbgemm, got 'mkl'"):
        Int8Linear(torch.randn(16, 32), torch.bfloat16, "mkl")


@needs_fbgemm
def test_fbgemm_layer_runs_under_inference_mode_then_no_grad_and_any_row_count():
    gen = torch.Generator().manual_seed(8)
    layer = Int8Linear(torch.randn(32, 64, generator=gen), torch.float32, "fbgemm")
    x = torch.randn(3, 64, generator=gen)
    with torch.inference_mode():
        first = layer(x)  # the reused input buffer is made here
    with torch.no_grad():
        assert torch.equal(layer(x), first)
        big = torch.randn(100, 64, generator=gen)  # more rows than are kept between calls
        assert torch.equal(layer(big)[:3], layer(big[:3]))
        assert torch.equal(layer(x), first)


def test_linear_kernels_name_what_runs_the_layers():
    assert linear_kernels(tiny()) == "torch"
    assert linear_kernels(quantized("int8", int8_kernel="aten")) == "int8 aten"
    assert linear_kernels(quantized("int4", int8_kernel="aten", int4_kernel="aten")) == "int4 aten, int8 aten"
    if HAS_NATIVE:  # the output projection stays int8 (OUTPUT_PROJECTION)
        expected = f"int4 native {native.q4_isa()}, int8 aten"
        assert linear_kernels(quantized("int4", int8_kernel="aten", int4_kernel="native")) == expected
    packed = tiny()
    if pack_linears(packed):
        assert linear_kernels(packed) == "oneDNN packed"
    own_bf16 = tiny().to(torch.bfloat16)
    if native.bf16_isa() is not None:
        pack_linears(own_bf16)
        assert linear_kernels(own_bf16) == f"bf16 native {native.bf16_isa()}"
