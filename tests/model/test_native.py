"""The native CPU kernels (model/native.py): built once, refused cleanly where they cannot run, and computing what
the PyTorch path computes, row by row whatever the batch."""

from __future__ import annotations

import logging
import os

import pytest
import torch

import model.native as native
from model.config import ModelConfig
from model.device import CpuCapability
from model.kv_cache import CacheBatch, KVCache
from model.llama import RMSNorm, Transformer
from model.quant import Int4Linear, pick_int4_kernel, quantize_model

AVX2 = CpuCapability(isa="AVX2", native_bf16=False)
AMX = CpuCapability(isa="AVX512", native_bf16=True)
NO_AVX2 = CpuCapability(isa="DEFAULT", native_bf16=False)
HAS_NATIVE = native.native_kernels() is not None
needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="no native kernels here (not x86-64 AVX2, or no compiler)")
CONFIG = ModelConfig.from_name("tiny")


def tiny(mode: str = "none") -> Transformer:
    """The tiny model in `mode`, quantized as on an AVX2 CPU (native int4 blocks, fbgemm's int8 output projection:
    fp32 activations throughout) whatever this CPU is."""
    model = Transformer(CONFIG)
    model.init_weights(seed=0)
    quantize_model(model.eval(), mode, capability=lambda: AVX2)
    return model


def q4_grid_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Weights already on a Q4_1 grid whose scale and minimum are exact in fp16, every block spanning 0..15."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.stack([torch.randperm(32, generator=gen) % 16 for _ in range(rows * cols // 32)]).view(rows, cols)
    scale = 2.0 ** -torch.randint(3, 8, (rows, cols // 32), generator=gen).float()
    lo = -torch.randint(1, 64, (rows, cols // 32), generator=gen).float() / 64
    return q.float() * scale.repeat_interleave(32, 1) + lo.repeat_interleave(32, 1)


@needs_native
def test_q4_blocks_reproduce_a_q4_1_grid_and_stay_within_half_a_step():
    w = q4_grid_weight(16, 128, seed=0)
    assert torch.equal(native.q4_dequantize(native.q4_quantize(w), 16, 128), w)
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(1))
    groups = w.view(24, 3, 32)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, dim=1)
    # fp16 scale and minimum round by up to 2^-11 of their value on top of the half step.
    bound = step * 0.5 + groups.abs().amax(-1).repeat_interleave(32, dim=1) * 2**-9
    assert ((native.q4_dequantize(native.q4_quantize(w), 24, 96) - w).abs() <= bound).all()


@needs_native
@pytest.mark.parametrize("out_features", [40, 21])  # whole groups of 8 weight rows, and a padded last group
def test_q4_matmul_is_the_dequantized_product_row_by_row(out_features):
    gen = torch.Generator().manual_seed(2)
    blocks = native.q4_quantize(torch.randn(out_features, 96, generator=gen))
    x = torch.randn(7, 96, generator=gen) * torch.logspace(-2, 1, 96)  # outlier channels, as real activations
    exact = x @ native.q4_dequantize(blocks, out_features, 96).t()
    y = native.q4_matmul(x, blocks, out_features)
    # The activations go in as 8-bit blocks of 32 (as llama.cpp's): up to half a step of 1/127 of a block's largest
    # value each, ~1% of the product with these outliers (the real model's cost is in bench.quality: +0.4% perplexity).
    assert ((y - exact).norm() / exact.norm()).item() < 2e-2
    for r in range(7):  # tiles of 4 rows and a tail of 3: a row's result never depends on the others
        assert torch.equal(native.q4_matmul(x[r : r + 1].contiguous(), blocks, out_features)[0], y[r])
    zero = native.q4_matmul(torch.zeros(1, 96), blocks, out_features)
    assert torch.equal(zero, torch.zeros(1, out_features))  # an all-zero (padding) row stays zero, not NaN


@pytest.fixture
def q4_isa():
    """Puts the 4-bit products back on the CPU's best kernel after a test pinned one."""
    best = native.q4_isa()
    yield best
    native.set_q4_isa(best)


@needs_native
@torch.inference_mode()
def test_vnni_products_are_the_avx2_products_bit_for_bit(q4_isa):
    """The best kernel the CPU has runs, and every one it has gives every output the AVX2 kernel gives (exact
    integer sums): tiles of 4 rows and each tail, whole and padded groups of weight rows, a whole model's logits. A
    kernel the CPU lacks is refused, the one in use kept."""
    if torch.cpu._is_vnni_supported():  # AVX512-VNNI, unless torch is kept to AVX2 (ATEN_CPU_CAPABILITY)
        assert q4_isa == native.q4_isa_within("AVX512-VNNI", torch.backends.cpu.get_cpu_capability())
    gen = torch.Generator().manual_seed(7)
    model = tiny("int4")
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 9), generator=gen)
    cases = [
        (native.q4_quantize(torch.randn(n, k, generator=gen)), n, torch.randn(11, k, generator=gen))
        for n, k in ((40, 96), (21, 160))
    ]
    results = {}
    for isa in native.Q4_ISAS:
        native.set_q4_isa(q4_isa)
        if native.set_q4_isa(isa) != isa:
            assert native.q4_isa() == q4_isa
            continue
        products = [native.q4_matmul(x[:rows].contiguous(), w, n) for w, n, x in cases for rows in range(1, 12)]
        results[isa] = (products, model(tokens))
    assert "AVX2" in results and q4_isa in results
    if len(results) == 1:
        pytest.skip("no VNNI on this CPU")
    avx2_products, avx2_logits = results.pop("AVX2")
    for products, logits in results.values():
        assert all(torch.equal(a, b) for a, b in zip(avx2_products, products, strict=True))
        assert torch.equal(avx2_logits, logits)


def test_the_4_bit_kernel_within_torchs_isa():
    assert native.q4_isa_within("AVX512-VNNI", "AVX512") == "AVX512-VNNI"
    assert native.q4_isa_within("AVX512-VNNI", "AVX2") == "AVX2"  # torch kept to AVX2 on an AVX-512 CPU
    assert native.q4_isa_within("AVX-VNNI", "AVX2") == "AVX-VNNI"  # an Alder Lake: torch is AVX2 there anyway
    assert native.q4_isa_within("AVX2", "AVX2") == "AVX2"


@needs_native
def test_the_4_bit_products_keep_to_torchs_isa():
    """ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU (the bench's way to approximate an AVX2-only machine) keeps the
    native kernels to AVX2 as well."""
    import subprocess
    import sys

    code = "from model import native; print(native.q4_isa())"
    run = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "AVX2"


@needs_native
@torch.inference_mode()
def test_int4_native_layer_streams_the_blocks_for_prompts_and_decode_rows_alike():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    layer = Int4Linear(w, torch.bfloat16, kernel="native")
    long = torch.randn(1, native.FUSED_MAX_ROWS + 1, 64)
    y = layer(long)
    assert ((y - long @ layer.dequantize().t()).norm() / y.norm()).item() < 2e-2
    assert torch.equal(y[0], native.q4_matmul(long[0].contiguous(), layer.blocks, 32))
    short = long[:, :3]
    assert torch.equal(layer(short), y[:, :3])  # a row's result does not depend on how many came with it
    assert layer(short.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="groups of 32 only, got 64"):
        Int4Linear(w, torch.float32, group_size=64, kernel="native")
    with pytest.raises(ValueError, match="int4 kernel: expected one of aten, native, got 'avx'"):
        Int4Linear(w, torch.float32, kernel="avx")


KV = tuple[torch.Tensor, torch.Tensor]


def greedy_decode(
    model: Transformer, prompt: torch.Tensor, steps: int, kv_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, KV]:
    """Prefill `prompt` (B, T) packed, then `steps` greedy decode steps: tokens, logits and the cache."""
    B, T = prompt.shape
    cache = model.new_kv_cache(max_slots=B + 1, max_len=64, dtype=kv_dtype)
    segments = [(b + 1, T, T) for b in range(B)]  # slot 0 stays unused: rows write their own slots
    packed = CacheBatch.build_packed(
        cache, segments, list(range(T)) * B, logits_index=[T * (b + 1) - 1 for b in range(B)]
    )
    logits = [model(prompt.reshape(1, -1), batch=packed)]
    tokens = [logits[-1].argmax(-1)]
    for i in range(steps):
        step = CacheBatch.build(cache, [b + 1 for b in range(B)], [[T + i]] * B, kv_len=32)
        logits.append(model(tokens[-1][:, None], batch=step)[:, 0])
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, 1), torch.stack(logits, 1), (cache.k.clone(), cache.v.clone())


@needs_native
@torch.inference_mode()
def test_native_attention_matches_the_pytorch_decode(monkeypatch):
    model = tiny()
    prompt = torch.randint(0, CONFIG.vocab_size, (3, 9), generator=torch.Generator().manual_seed(4))
    tokens, logits, (k, v) = greedy_decode(model, prompt, 6)
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    ref_tokens, ref_logits, (ref_k, ref_v) = greedy_decode(model, prompt, 6)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k, ref_k, rtol=1e-5, atol=1e-5)  # the keys and values each step wrote
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)


def assert_same_up_to_activation_rounding(fused: torch.Tensor, ref: torch.Tensor) -> None:
    """The fused blocks compute what the blocks do one by one, but their last-bit differences (a vectorized exp in
    silu and softmax, the order of a sum) can move an activation across an 8-bit rounding boundary of the 4-bit
    kernel (~1/127 of its block's largest value): close, not bit-identical."""
    assert (fused - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert ((fused - ref).norm() / ref.norm()).item() < 2e-3


@needs_native
@torch.inference_mode()
def test_fused_int4_blocks_match_the_block_by_block_path(monkeypatch):
    model = tiny("int4")
    assert native.q4_layer_blocks(model.layers[0].attention.wqkv) is not None
    cache = model.new_kv_cache(max_slots=3, max_len=64)
    for slot in range(3):  # some history in each slot
        cache.k[:, slot, :, :20].normal_(generator=torch.Generator().manual_seed(slot))
        cache.v[:, slot, :, :20].normal_(generator=torch.Generator().manual_seed(10 + slot))
    tokens = torch.tensor([[17], [4242]])
    batch = CacheBatch.build(cache, [2, 0], [[20], [7]], kv_len=32)
    before = cache.k.clone(), cache.v.clone()
    fused = model(tokens, batch=batch)
    after = cache.k.clone(), cache.v.clone()
    cache.k.copy_(before[0])
    cache.v.copy_(before[1])
    monkeypatch.setattr(native, "decode_layers", lambda *args: None)  # the blocks one by one, native attention
    ref = model(tokens, batch=batch)
    assert_same_up_to_activation_rounding(fused, ref)
    torch.testing.assert_close(after[0], cache.k, rtol=1e-5, atol=1e-5)
    assert torch.equal(after[1][:, :, :, :7], cache.v[:, :, :, :7])  # only the rows' own positions are written
    assert not torch.equal(after[0], before[0])


@needs_native
@torch.inference_mode()
def test_fused_int4_prompts_match_the_block_by_block_path(monkeypatch):
    """A packed prefill (a fresh prompt, and a continuation attending its slot's history) runs as token rows."""
    model = tiny("int4")
    cache = model.new_kv_cache(max_slots=2, max_len=64)
    cache.k[:, 1, :, :5].normal_(generator=torch.Generator().manual_seed(0))
    cache.v[:, 1, :, :5].normal_(generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, CONFIG.vocab_size, (1, 11), generator=torch.Generator().manual_seed(2))
    positions = [*range(6), *range(5, 10)]  # slot 0: a 6-token prompt; slot 1: 5 tokens after 5 cached ones
    batch = CacheBatch.build_packed(cache, [(0, 6, 8), (1, 5, 16)], positions, logits_index=[5, 10])
    assert native.token_rows(batch, model.tok_embeddings(ids)) is not None
    before = cache.k.clone(), cache.v.clone()
    fused = model(ids, batch=batch)
    after = cache.k.clone(), cache.v.clone()
    cache.k.copy_(before[0])
    cache.v.copy_(before[1])
    monkeypatch.setattr(native, "decode_layers", lambda *args: None)
    ref = model(ids, batch=batch)
    assert fused.shape == ref.shape == (2, CONFIG.vocab_size)
    assert_same_up_to_activation_rounding(fused, ref)
    assert_same_up_to_activation_rounding(after[0], cache.k)
    assert_same_up_to_activation_rounding(after[1], cache.v)
    # A prompt longer than the fused row limit, or a short one attending a long history, takes the block-by-block
    # path (its causal SDPA beats one row at a time there).
    n = native.FUSED_MAX_ROWS + 1
    big = KVCache(CONFIG.n_layer, 1, 2 * n, CONFIG.n_kv_head, CONFIG.head_dim, n_rep=CONFIG.n_rep)
    long = torch.zeros(1, n, CONFIG.n_embd)
    assert native.token_rows(CacheBatch.build_packed(big, [(0, n, n)], list(range(n))), long) is None
    fits = native.FUSED_MAX_ROWS
    assert native.token_rows(CacheBatch.build_packed(big, [(0, fits, fits)], list(range(fits))), long[:, :fits])
    start = native.FUSED_MAX_MEAN_KEYS  # 8 tokens after that many cached ones: too many keys a token
    late = CacheBatch.build_packed(big, [(0, 8, start + 8)], list(range(start, start + 8)))
    assert native.token_rows(late, long[:, :8]) is None
    early = CacheBatch.build_packed(big, [(0, 8, start)], list(range(start - 8, start)))
    assert native.token_rows(early, long[:, :8]) is not None


@needs_native
@torch.inference_mode()
@pytest.mark.parametrize("mode", ["none", "int4"])  # native attention alone; every block in one call
def test_native_attention_on_an_fp16_cache_matches_the_pytorch_path(monkeypatch, mode):
    """The native kernels read and write an fp16 cache as the PyTorch path does (round once when written, widen
    exactly when read): the same tokens and cache, logits within the fp32 paths' own difference; and the fp16 cache
    is really what they read (its logits differ from an fp32 cache's by fp16 rounding only)."""
    model = tiny(mode)
    prompt = torch.randint(0, CONFIG.vocab_size, (3, 9), generator=torch.Generator().manual_seed(5))
    tokens, logits, (k, v) = greedy_decode(model, prompt, 6, torch.float16)
    assert k.dtype == v.dtype == torch.float16
    _, fp32_logits, _ = greedy_decode(model, prompt, 6, torch.float32)
    assert not torch.equal(logits, fp32_logits)
    assert (logits - fp32_logits).abs().max() < 2e-2 * fp32_logits.abs().max()
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    ref_tokens, ref_logits, (ref_k, ref_v) = greedy_decode(model, prompt, 6, torch.float16)
    assert torch.equal(tokens, ref_tokens)
    tolerance = {"none": 1e-4, "int4": 2e-2}[mode]  # int4: the 8-bit activations' rounding, as in the fp32 tests
    torch.testing.assert_close(logits, ref_logits, rtol=tolerance, atol=tolerance * ref_logits.abs().max().item())
    written = ref_k != 0
    assert written.any() and torch.equal(written, k != 0)  # the same positions, nothing else
    torch.testing.assert_close(k.float(), ref_k.float(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(v.float(), ref_v.float(), rtol=tolerance, atol=tolerance)


@needs_native
@torch.inference_mode()
def test_fp16_attention_reads_the_same_values_grouped_or_per_head():
    """Many rows read an fp16 cache once per key/value head (widened into fp32, shared by its query heads), a row
    alone once per query head: every row's output is the same bits either way, and the same as from an fp32 cache
    holding the widened values."""
    gen = torch.Generator().manual_seed(9)
    rows, n_head, n_kv_head, head_dim, max_len = 12, 6, 2, 24, 40  # head_dim not a multiple of 8: the scalar tails too
    qkv = torch.randn(rows, (n_head + 2 * n_kv_head) * head_dim, generator=gen)
    cos, sin = torch.randn(rows, head_dim, generator=gen), torch.randn(rows, head_dim, generator=gen)
    history = torch.randn(rows, n_kv_head, max_len, head_dim, generator=gen).half()
    slots, positions = torch.arange(rows), torch.randint(0, 33, (rows,), generator=gen)

    def attend(cache_dtype, r):
        k, v = history.to(cache_dtype, copy=True), (history * 0.5).to(cache_dtype)
        return native.attention_decode(
            qkv[r].contiguous(),
            n_head,
            n_kv_head,
            cos[r].contiguous(),
            sin[r].contiguous(),
            k,
            v,
            slots[r].contiguous(),
            positions[r].contiguous(),
            34,
        ), k

    grouped, k_half = attend(torch.float16, slice(None))
    assert k_half.dtype == torch.float16 and not torch.equal(k_half, history)  # the rows' own keys were written
    per_head = torch.cat([attend(torch.float16, slice(r, r + 1))[0] for r in range(rows)])
    assert torch.equal(grouped, per_head)
    # An fp32 cache of the same history: only the rows' new keys and values, unrounded there, differ.
    widened, _ = attend(torch.float32, slice(None))
    assert not torch.equal(grouped, widened) and (grouped - widened).abs().max() < 1e-2


@needs_native
@torch.inference_mode()
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_greedy_int4_tokens_are_the_same_alone_and_in_a_batch(kv_dtype):
    model = tiny("int4")
    prompt = torch.randint(0, CONFIG.vocab_size, (5, 7), generator=torch.Generator().manual_seed(6))
    tokens, logits, _ = greedy_decode(model, prompt, 8, kv_dtype)
    for b in (0, 4):
        alone_tokens, alone_logits, _ = greedy_decode(model, prompt[b : b + 1], 8, kv_dtype)
        assert torch.equal(alone_tokens[0], tokens[b])
        assert torch.equal(alone_logits[0], logits[b])


@needs_native
@torch.inference_mode()
def test_rms_norm_matches_the_module():
    norm = RMSNorm(96, 1e-5)
    norm.weight.data.normal_()
    x = torch.randn(5, 3, 96) * 30
    with torch.enable_grad():
        ref = norm(x)  # autograd on: the PyTorch path
    torch.testing.assert_close(native.rms_norm(x, norm.weight, 1e-5), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm(x), ref.detach(), rtol=1e-5, atol=1e-5)


def test_usable_only_for_fp32_cpu_inference():
    x = torch.zeros(2, 32)
    with torch.enable_grad():
        assert not native.usable(x)  # training needs autograd: the kernels have none
    with torch.inference_mode():
        assert native.usable(x) == HAS_NATIVE
        assert not native.usable(x.bfloat16())


def test_no_kernels_without_avx2_a_compiler_or_when_switched_off(monkeypatch, caplog, tmp_path):
    build = native.native_kernels.__wrapped__
    caplog.set_level(logging.INFO, logger="model.native")
    assert build(lambda: NO_AVX2) is None
    assert "need x86-64 with AVX2" in caplog.text
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert build(lambda: AVX2) is None
    assert "native CPU kernels off" in caplog.text
    monkeypatch.delenv(native.DISABLE_ENV)
    monkeypatch.setenv("SMOLLM_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(native, "compiler", lambda: None)
    assert build(lambda: AVX2) is None
    assert "no C compiler" in caplog.text


@needs_native
def test_a_library_built_before_needs_no_compiler(monkeypatch, tmp_path):
    cc = native.compiler()
    assert cc is not None
    native.build(tmp_path, cc)  # as the server image's build step does
    monkeypatch.setenv("SMOLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "compiler", lambda: None)
    lib = native.native_kernels.__wrapped__(lambda: AVX2)
    assert lib is not None and lib.smollm_abi_version() == native.ABI_VERSION


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
def test_a_failed_build_is_a_warning_and_the_pytorch_path(monkeypatch, tmp_path, caplog):
    with pytest.raises(RuntimeError, match="failed to build native_kernels.c"):
        native.build(tmp_path, "false")  # a compiler that exits 1
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".native-kernels-*"))  # nothing half-written
    monkeypatch.setenv("SMOLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "compiler", lambda: "false")
    with caplog.at_level(logging.WARNING, logger="model.native"):
        assert native.native_kernels.__wrapped__(lambda: AVX2) is None
    assert "native CPU kernels unavailable" in caplog.text


@needs_native
def test_the_library_is_built_once_per_source(tmp_path):
    cc = native.compiler()
    assert cc is not None
    first = native.build(tmp_path, cc)
    mtime = first.stat().st_mtime_ns
    assert native.build(tmp_path, cc) == first and first.stat().st_mtime_ns == mtime
    assert native.load(first).smollm_abi_version() == native.ABI_VERSION


def test_int4_kernel_follows_the_cpu(monkeypatch):
    # Native wherever the kernels run, AVX-512 and AMX CPUs included (measured faster there too: model/quant.py).
    assert pick_int4_kernel(lambda: AMX) == ("native" if HAS_NATIVE else "aten")
    assert pick_int4_kernel(lambda: AVX2) == ("native" if HAS_NATIVE else "aten")
    assert pick_int4_kernel(lambda: NO_AVX2) == "aten"
    monkeypatch.setattr(native, "native_kernels", lambda: None)
    assert pick_int4_kernel(lambda: AVX2) == "aten"
    assert pick_int4_kernel(lambda: AMX) == "aten"
    model = tiny()
    quantize_model(model, "int4", capability=lambda: AVX2)
    assert {m.kernel for m in model.modules() if isinstance(m, Int4Linear)} == {"aten"}
    prompt = torch.arange(8)[None]
    with torch.inference_mode():
        assert torch.isfinite(model(prompt)).all()  # and the PyTorch path serves


@needs_native
@torch.inference_mode()
def test_rows_outside_the_cache_are_refused_before_the_c_code_runs():
    model = tiny("int4")
    cache = model.new_kv_cache(max_slots=2, max_len=32)
    x = torch.zeros(1, 1, CONFIG.n_embd)
    cos = sin = torch.zeros(1, 1, 1, CONFIG.head_dim)
    for slots, positions, kv_len in (([2], [0], 16), ([0], [16], 16), ([0], [-1], 16), ([-1], [0], 16)):
        rows = (torch.tensor(slots), torch.tensor(positions))
        with pytest.raises(ValueError, match="outside the cache"):
            native.decode_layers(x, model.layers, cos, sin, cache, rows, kv_len)
    with pytest.raises(ValueError, match="outside the cache"):
        qkv = torch.zeros(1, (CONFIG.n_head + 2 * CONFIG.n_kv_head) * CONFIG.head_dim)
        native.attention_decode(
            qkv,
            CONFIG.n_head,
            CONFIG.n_kv_head,
            cos[0, 0],
            sin[0, 0],
            cache.k[0],
            cache.v[0],
            torch.tensor([0]),
            torch.tensor([40]),
            48,
        )
