"""Packed (oneDNN-reordered) linear layers give the same model outputs as the plain ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import native
from model.config import ModelConfig
from model.kv_cache import CacheBatch
from model.llama import Transformer
from model.packed_linear import AmxLinear, PackedLinear, amx_packs, can_pack, pack_linears

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
    if isinstance(packed.output, AmxLinear):  # bf16 on the AMX kernel: its own summation order
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


needs_amx = pytest.mark.skipif(not native.bf16_amx(), reason="no AMX-BF16 here (or no native kernels)")


@needs_amx
@torch.inference_mode()
def test_amx_layer_rows_do_not_depend_on_the_rows_around_them():
    """Any number of rows (oneDNN's bf16 kernel changed its sums from 33 rows on), tails of a 16-row tile, and
    outputs not a multiple of 32: every row gets the bits it gets alone, within bf16 rounding of the exact product."""
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(576, 200, bias=False)
    nn.init.normal_(linear.weight, std=0.05, generator=gen)
    linear = linear.to(torch.bfloat16)
    layer = AmxLinear(linear)
    x = torch.randn(70, 576, generator=gen).to(torch.bfloat16)
    batched = layer(x)
    exact = x.float() @ linear.weight.float().t()
    assert ((batched.float() - exact).norm() / exact.norm()).item() < 5e-3
    for n in (1, 5, 16, 17, 33, 48):
        assert torch.equal(layer(x[:n]), batched[:n])
    assert torch.equal(layer(x[40:41]), batched[40:41])
    assert layer(x.view(7, 10, 576)).shape == (7, 10, 200)


@needs_amx
@torch.inference_mode()
def test_a_bf16_model_on_amx_decodes_a_sequence_alike_alone_and_in_a_batch_of_40():
    """Every projection on the AMX kernel, prefill and decode, 40 rows (past the 32 where oneDNN's bf16 kernel
    changes its sums; the tiny model's shapes do not show that change, the layer test above does)."""
    model = tiny(torch.bfloat16)
    assert amx_packs(model) and pack_linears(model) == 4 * CONFIG.n_layer + 1
    assert isinstance(model.layers[0].attention.wqkv, AmxLinear)
    prompts = torch.randint(0, CONFIG.vocab_size, (40, 7), generator=torch.Generator().manual_seed(4))
    batched = decode_logits(model, prompts, 4)
    for b in (0, 39):
        assert torch.equal(decode_logits(model, prompts[b : b + 1], 4)[0], batched[b])


def test_amx_packing_needs_bf16_and_inputs_in_steps_of_32():
    assert not amx_packs(tiny(torch.float32))
    odd = nn.Sequential(nn.Linear(48, 32, bias=False)).to(torch.bfloat16)
    assert not amx_packs(odd)  # 48 inputs: not whole 32-input steps, so oneDNN (or nothing) packs it
    if native.native_kernels() is not None:
        with pytest.raises(ValueError, match="in_features a multiple of 32"):
            native.bf16_pack(torch.zeros(4, 48, dtype=torch.bfloat16))


@pytest.mark.skipif(native.native_kernels() is None, reason="no native kernels here")
def test_packing_for_amx_without_it_is_an_error_not_a_crash(monkeypatch):
    lib = native.native_kernels()

    class NoAmx:  # the library as a CPU without AMX-BF16 reports it; everything else as built
        def __getattr__(self, name):
            return getattr(lib, name)

        def smollm_bf16_amx_ready(self):
            return 0

    monkeypatch.setattr(native, "native_kernels", lambda: NoAmx())
    assert not native.bf16_amx() and not amx_packs(tiny(torch.bfloat16))
    with pytest.raises(RuntimeError, match="no AMX-BF16"):
        AmxLinear(nn.Linear(64, 32, bias=False).to(torch.bfloat16))


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
