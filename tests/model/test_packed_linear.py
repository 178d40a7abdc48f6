"""Packed (oneDNN-reordered) linear layers give the same model outputs as the plain ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.config import ModelConfig
from model.kv_cache import CacheBatch
from model.llama import Transformer
from model.packed_linear import PackedLinear, can_pack, pack_linears

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
    if dtype == torch.bfloat16:
        assert torch.equal(plain_out, packed_out)  # the same kernels, only the weight layout differs
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
