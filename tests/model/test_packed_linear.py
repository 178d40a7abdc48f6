"""Packed (oneDNN-reordered) linear layers give the same model outputs as the plain ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import native
from model.config import ModelConfig
from model.kv_cache import CacheBatch
from model.llama import Transformer
from model.packed_linear import Bf16Linear, PackedLinear, bf16_kernel_packs, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")

CONFIG = ModelConfig.from_name("tiny")


def tiny(dtype: torch.dtype) -> Transformer:
    model = Transformer(CONFIG)
    model.init_weights(seed=0)
    return model.to(dtype).eval()


def packed_copy(model: Transformer) -> Transformer:
    other = Transformer(CONFIG).to(model.dtype).eval()
    other.load_state_dict(model.state_dict())
    assert pack_linears(other) == 4 * CONFIG.n_layer + 1  # wqkv, wo, w13, w2 per layer, and the output
    return other


def decode_logits(model: Transformer, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill then `steps` greedy decode steps through the KV cache; the logits of every step."""
    B, T = prompt.shape
    cache = model.new_kv_cache(max_slots=B, max_len=64)
    slots = range(B)
    out = [model(prompt, batch=CacheBatch.build(cache, slots, [range(T)] * B))[:, -1]]
    for i in range(steps):
        token = out[-1].argmax(-1, keepdim=True)
        out.append(model(token, batch=CacheBatch.build(cache, slots, [[T + i]] * B))[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_packed_model_matches_plain(dtype):
    if dtype == torch.bfloat16 and not can_pack(tiny(dtype)):
        pytest.skip("no oneDNN bf16 on this CPU")
    model = tiny(dtype)
    packed = packed_copy(model)
    prompt = torch.randint(0, CONFIG.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    plain_out, packed_out = decode_logits(model, prompt, 6), decode_logits(packed, prompt, 6)
    if isinstance(packed.output, Bf16Linear):  # bf16 on our own kernel: its own summation order
        torch.testing.assert_close(packed_out, plain_out, rtol=2e-2, atol=2e-2)
        assert torch.equal(plain_out.argmax(-1), packed_out.argmax(-1))
    elif dtype == torch.bfloat16:
        assert torch.equal(plain_out, packed_out)  # the same oneDNN kernels, only the weight layout differs
    else:
        torch.testing.assert_close(packed_out, plain_out, rtol=1e-4, atol=1e-4)
        assert torch.equal(plain_out.argmax(-1), packed_out.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_a_row_does_not_depend_on_the_rows_around_it(dtype):
    linear = nn.Linear(576, 960, bias=False).to(dtype)
    if not can_pack(linear):
        pytest.skip("no oneDNN support for this dtype")
    layer = PackedLinear(linear)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(0)).to(dtype)
    batched = layer(x)
    for n in (1, 3, 7):
        assert torch.equal(layer(x[:n]), batched[:n])


def bf16_kernels_here() -> list[str]:
    """The bf16 kernels this CPU runs (pinning each in turn; the library's choice is put back)."""
    if native.bf16_isa() is None:
        return []
    best = native.bf16_isa()
    here = [isa for isa in ("AVX512-BF16", "AMX") if native.set_bf16_isa(isa) == isa]
    native.set_bf16_isa(best)
    return here


BF16_KERNELS = bf16_kernels_here()


@pytest.fixture(params=("AVX512-BF16", "AMX"))
def bf16_kernel(request):
    """Each bf16 kernel in turn, pinned for the test (skipped where the CPU lacks it)."""
    if request.param not in BF16_KERNELS:
        pytest.skip(f"no {request.param} here (or no native kernels)")
    best = native.bf16_isa()
    assert native.set_bf16_isa(request.param) == request.param
    yield request.param
    native.set_bf16_isa(best)


@torch.inference_mode()
def test_bf16_layer_rows_do_not_depend_on_the_rows_around_them(bf16_kernel):
    """Any number of rows (oneDNN's bf16 kernel changed its sums from 33 rows on with AMX, from 2 without), tails of
    a 16-row AMX tile and of a 6-row AVX512-BF16 one, and outputs not a multiple of 32 (nor of 16): every row gets
    the bits it gets alone, within bf16 rounding of the exact product."""
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(576, 200, bias=False)
    nn.init.normal_(linear.weight, std=0.05, generator=gen)
    linear = linear.to(torch.bfloat16)
    layer = Bf16Linear(linear)
    x = torch.randn(70, 576, generator=gen).to(torch.bfloat16)
    batched = layer(x)
    exact = x.float() @ linear.weight.float().t()
    assert ((batched.float() - exact).norm() / exact.norm()).item() < 5e-3
    for n in (1, 2, 5, 6, 7, 16, 17, 33, 48):
        assert torch.equal(layer(x[:n]), batched[:n])
    assert torch.equal(layer(x[40:41]), batched[40:41])
    assert layer(x.view(7, 10, 576)).shape == (7, 10, 200)
    small = nn.Linear(64, 8, bias=False).to(torch.bfloat16)  # 8 outputs: half a 16-output group
    narrow = Bf16Linear(small)
    x64 = x[:9, :64].contiguous()
    y = narrow(x64)
    assert y.shape == (9, 8) and torch.equal(narrow(x64[4:5]), y[4:5])
    torch.testing.assert_close(y.float(), x64.float() @ small.weight.float().t(), rtol=2e-2, atol=2e-2)


@torch.inference_mode()
def test_a_bf16_model_decodes_a_sequence_alike_alone_and_in_a_batch_of_40(bf16_kernel):
    """Every projection on the bf16 kernel, prefill and decode, 40 rows (past the 32 where oneDNN's AMX bf16 kernel
    changes its sums; the tiny model's shapes do not show that change, the layer test above does)."""
    model = tiny(torch.bfloat16)
    assert bf16_kernel_packs(model) and pack_linears(model) == 4 * CONFIG.n_layer + 1
    assert isinstance(model.layers[0].attention.wqkv, Bf16Linear)
    prompts = torch.randint(0, CONFIG.vocab_size, (40, 7), generator=torch.Generator().manual_seed(4))
    batched = decode_logits(model, prompts, 4)
    for b in (0, 39):
        assert torch.equal(decode_logits(model, prompts[b : b + 1], 4)[0], batched[b])


@pytest.mark.skipif(len(BF16_KERNELS) < 2, reason="needs both bf16 kernels (an AMX CPU)")
@torch.inference_mode()
def test_the_two_bf16_kernels_agree_within_rounding():
    """The same packed weight on AMX tiles and on vdpbf16ps: each kernel is batch-invariant on its own; across the
    two, outputs agree to bf16 rounding (on the AMX Xeon they gave the same bits, which nothing promises)."""
    gen = torch.Generator().manual_seed(5)
    linear = nn.Linear(1536, 576, bias=False)
    nn.init.normal_(linear.weight, std=0.03, generator=gen)
    layer = Bf16Linear(linear.to(torch.bfloat16))
    x = torch.randn(37, 1536, generator=gen).to(torch.bfloat16)
    best = native.bf16_isa()
    try:
        results = {isa: layer(x) for isa in BF16_KERNELS if native.set_bf16_isa(isa) == isa}
    finally:
        native.set_bf16_isa(best)
    torch.testing.assert_close(results["AVX512-BF16"], results["AMX"], rtol=1e-2, atol=1e-2)


def test_bf16_kernel_packing_needs_bf16_and_inputs_in_steps_of_32():
    assert not bf16_kernel_packs(tiny(torch.float32))
    odd = nn.Sequential(nn.Linear(48, 32, bias=False)).to(torch.bfloat16)
    assert not bf16_kernel_packs(odd)  # 48 inputs: not whole 32-input steps, so oneDNN (or nothing) packs it
    if native.native_kernels() is not None:
        with pytest.raises(ValueError, match="in_features a multiple of 32"):
            native.bf16_pack(torch.zeros(4, 48, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    ("best", "onednn", "expected"),
    [
        ("AMX", None, "AMX"),
        ("AMX", "ALL", "AMX"),
        ("AMX", "avx512_core_amx", "AMX"),
        ("AMX", "AVX512_CORE_BF16", "AVX512-BF16"),  # approximating Cooper Lake / Zen 4 on an AMX Xeon
        ("AMX", "AVX2", "none"),  # approximating an AVX2-only CPU: bf16 stays on oneDNN (emulated)
        ("AVX512-BF16", None, "AVX512-BF16"),
        ("AVX512-BF16", "AVX512_CORE", "none"),
        ("none", "ALL", "none"),
    ],
)
def test_the_bf16_kernel_stays_within_what_onednn_may_use(best, onednn, expected):
    assert native.bf16_isa_within(best, onednn) == expected


@pytest.mark.skipif(native.native_kernels() is None, reason="no native kernels here")
def test_packing_for_a_bf16_kernel_without_one_is_an_error_not_a_crash(monkeypatch):
    lib = native.native_kernels()

    class NoBf16:  # the library as a CPU without AVX512-BF16 (nor AMX) reports it; everything else as built
        def __getattr__(self, name):
            return getattr(lib, name)

        def smollm_bf16_isa(self):
            return native.BF16_ISAS.index("none")

    monkeypatch.setattr(native, "native_kernels", lambda: NoBf16())
    assert native.bf16_isa() is None and not bf16_kernel_packs(tiny(torch.bfloat16))
    with pytest.raises(RuntimeError, match="neither AMX-BF16 nor AVX512-BF16"):
        Bf16Linear(nn.Linear(64, 32, bias=False).to(torch.bfloat16))


def test_packed_layers_leave_the_state_dict():
    model = tiny(torch.float32)
    pack_linears(model)
    keys = model.state_dict().keys()
    assert not any(k.endswith(("wqkv.weight", "w13.weight")) for k in keys)
    assert "tok_embeddings.weight" in keys  # the tied embedding keeps its weight
    assert isinstance(model.output, PackedLinear)


def test_unsupported_dtype_is_left_alone():
    model = tiny(torch.float16)
    assert not can_pack(model)
    assert pack_linears(model) == 0
    assert isinstance(model.output, nn.Linear)


def test_bias_is_refused():
    with pytest.raises(ValueError, match="bias"):
        PackedLinear(nn.Linear(4, 4, bias=True))
