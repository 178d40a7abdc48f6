"""What the server does to a checkpoint when it loads it: precision by hardware, packing, quantization, slots."""

from __future__ import annotations

import logging

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import model.device as devices
import model.quant as quant
from model import native
from model.device import CpuCapability
from model.packed_linear import Bf16Linear, PackedLinear, bf16_kernel_packs, can_pack
from service.loading import build_engine, kv_slots, make_loader, resolve_precision
from service.settings import Settings
from tests.service.conftest import tiny_settings

AVX2 = CpuCapability(isa="AVX2", native_bf16=False)
AVX512_BF16 = CpuCapability(isa="AVX512", native_bf16=True)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_linear_weights_are_packed_unless_disabled(tiny_checkpoint):
    model, tokenizer = make_loader(tiny_settings(tiny_checkpoint))(tiny_checkpoint)
    assert isinstance(model.output, PackedLinear)
    assert isinstance(model.layers[0].attention.wqkv, PackedLinear)
    assert tokenizer is not None

    model, _ = make_loader(tiny_settings(tiny_checkpoint, pack_weights=False))(tiny_checkpoint)
    assert type(model.output) is nn.Linear


def test_auto_is_the_default_dtype():
    assert Settings().dtype == "auto"
    with pytest.raises(ValidationError, match="dtype"):
        Settings(dtype="float64")


@pytest.mark.parametrize(("capability", "expected"), [(AVX2, torch.float32), (AVX512_BF16, torch.bfloat16)])
def test_auto_dtype_follows_the_cpu(monkeypatch, tiny_checkpoint, capability, expected):
    monkeypatch.setattr(devices, "cpu_capability", lambda: capability)
    precision = resolve_precision(tiny_settings(tiny_checkpoint, dtype="auto", device="cpu"))
    assert precision.dtype == expected and precision.cpu_isa == capability.isa
    assert precision.labels()["dtype"] == str(expected).removeprefix("torch.")
    model, _ = make_loader(tiny_settings(tiny_checkpoint, dtype="auto", device="cpu"))(tiny_checkpoint)
    assert model.dtype == expected
    # Packing follows the chosen dtype: bf16 on our bf16 kernel where it runs, else oneDNN where it computes the dtype
    # natively on this build, nothing else.
    plain = make_loader(tiny_settings(tiny_checkpoint, dtype="auto", device="cpu", pack_weights=False))(
        tiny_checkpoint
    )[0]
    assert isinstance(model.output, Bf16Linear) == bf16_kernel_packs(plain)
    assert isinstance(model.output, PackedLinear) == (can_pack(plain) and not bf16_kernel_packs(plain))


@pytest.mark.parametrize("capability", [AVX2, AVX512_BF16])
def test_explicit_dtypes_win_over_the_cpu(monkeypatch, tiny_checkpoint, capability):
    monkeypatch.setattr(devices, "cpu_capability", lambda: capability)
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        assert resolve_precision(tiny_settings(tiny_checkpoint, dtype=name, device="cpu")).dtype == dtype


# Each weight-only mode: its layer type, the kernel that takes fp32 activations, and how to make that kernel absent.
QUANT_KERNELS = {
    "int4": (quant.Int4Linear, "native", (native, "native_kernels", lambda: None)),
    "int8": (quant.Int8Linear, "fbgemm", (quant, "fbgemm_available", lambda: False)),
}


@pytest.mark.parametrize("mode", sorted(QUANT_KERNELS))
@pytest.mark.parametrize("capability", [AVX2, AVX512_BF16])
def test_auto_serves_quantized_modes_in_fp32_where_their_kernels_take_it(
    monkeypatch, tiny_checkpoint, capability, mode
):
    """The native int4 kernels and fbgemm's int8 GEMM take fp32 activations, so `auto` with int4 or int8 is fp32 on
    both kinds of CPU where they run; where they cannot, the mode runs aten's kernels in the dtype auto picks for
    the CPU. An explicit dtype wins."""
    layer_type, fast, (module, attr, absent) = QUANT_KERNELS[mode]
    monkeypatch.setattr(devices, "cpu_capability", lambda: capability)
    settings = tiny_settings(tiny_checkpoint, dtype="auto", device="cpu", quant=mode)
    fast_here = quant.pick_int4_kernel() if mode == "int4" else quant.pick_int8_kernel()
    if fast_here == fast:
        assert resolve_precision(settings).dtype == torch.float32
        loaded, _ = make_loader(settings)(tiny_checkpoint)
        assert loaded.dtype == torch.float32
        assert {m.kernel for m in loaded.modules() if isinstance(m, layer_type)} == {fast}
    explicit = tiny_settings(tiny_checkpoint, dtype="bfloat16", device="cpu", quant=mode)
    assert resolve_precision(explicit).dtype == torch.bfloat16
    monkeypatch.setattr(module, attr, absent)
    fallback = torch.bfloat16 if capability.native_bf16 else torch.float32
    assert resolve_precision(settings).dtype == fallback
    loaded, _ = make_loader(settings)(tiny_checkpoint)
    assert loaded.dtype == fallback
    assert {m.kernel for m in loaded.modules() if isinstance(m, layer_type)} == {"aten"}


def test_the_choice_is_logged_at_start(monkeypatch, tiny_checkpoint, caplog):
    monkeypatch.setattr(devices, "cpu_capability", lambda: CpuCapability(isa="FAKEISA", native_bf16=False))
    with caplog.at_level(logging.INFO, logger="service.loading"):
        engine, _ = build_engine(tiny_settings(tiny_checkpoint, dtype="auto", device="cpu"))
    text = caplog.text
    assert "dtype float32 (auto requested)" in text and "CPU ISA FAKEISA" in text
    assert "KV cache 4 slots x 2048 tokens" in text


def test_default_slots_serve_64_streams():
    assert Settings().max_batch_size == 64


def test_kv_cache_memory_caps_the_slots(tiny_checkpoint):
    model, _ = make_loader(tiny_settings(tiny_checkpoint))(tiny_checkpoint)
    c = model.config
    per_slot = 2 * c.n_layer * c.n_kv_head * c.head_dim * 4 * 2048  # fp32 K and V for 2048 positions
    assert kv_slots(tiny_settings(tiny_checkpoint, max_batch_size=64), model) == 64
    budget = 3.5 * per_slot / 2**30
    assert kv_slots(tiny_settings(tiny_checkpoint, max_batch_size=64, kv_cache_memory=budget), model) == 3
    assert kv_slots(tiny_settings(tiny_checkpoint, max_batch_size=2, kv_cache_memory=budget), model) == 2
    # An fp16 cache under the fp32 model: twice the slots in the same memory.
    fp16 = kv_slots(tiny_settings(tiny_checkpoint, max_batch_size=64, kv_cache_memory=budget), model, torch.float16)
    assert fp16 == 7
    with pytest.raises(ValueError, match="kv_cache_memory"):
        kv_slots(tiny_settings(tiny_checkpoint, kv_cache_memory=0.5 * per_slot / 2**30), model)


def test_quant_setting_is_validated():
    assert Settings().quant == "none"
    with pytest.raises(ValidationError, match="quant"):
        Settings(quant="int3")


def test_quant_setting_quantizes_after_loading(tiny_checkpoint):
    from model.quant import Int8Linear

    model, _ = make_loader(tiny_settings(tiny_checkpoint, quant="int8"))(tiny_checkpoint)
    assert model.dtype == torch.float32
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    model, _ = make_loader(tiny_settings(tiny_checkpoint, quant="none"))(tiny_checkpoint)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


def test_a_checkpoint_with_the_same_tokenizer_files_reuses_the_loaded_tokenizer(tiny_checkpoint, tmp_path):
    import shutil

    load = make_loader(tiny_settings(tiny_checkpoint))
    _, first = load(tiny_checkpoint)
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "step-000002")
    model, again = load(copy)
    assert again is first and model.config.vocab_size == 49152
    # Another tokenizer (here: one more chat template line) is loaded from its own files.
    (copy / "chat_template.jinja").write_text((copy / "chat_template.jinja").read_text() + "\n")
    _, other = load(copy)
    assert other is not first
    assert other.chat_template == (copy / "chat_template.jinja").read_text()
