"""Hand-written CPU kernels for the decode step (model/native_kernels.c), compiled at first use and called through
ctypes: `native_kernels()` is the loaded library, or None where it cannot run (then every caller keeps its
PyTorch path).

Why by hand, measured on the AVX2-only EPYC (2 threads, 2026-11-30, one decode token of the 135M model in int4):
torch's int4 kernel (`_weight_int4pack_mm_for_cpu`) takes 16.2 ms for the 120 layer projections, ~4 GB/s of 4-bit
weights, and the step spends ~14 ms more in ~4,000 small tensor ops around the matmuls; torchao 0.18 has no CPU
kernels of its own (model/quant.py). Here `q4_matmul` streams the same weights at 10-12 GB/s (5.7-7 ms) with 8-bit
activations, and `decode_layers` runs every transformer block of a step in one call: the one-token step went from
40 to 12.3 ms, a 16-row one from 136 to 55 ms, a 24-token prompt from 103 to 72 ms (bench/README.md, "Native int4
kernels"). With weight rows interleaved by 8 (model/native_kernels.c) batched products got ~2.1x faster: steps of
1 / 16 / 64 rows take 10.4 / 40.3 / 172 ms ("Weight rows interleaved by 8"). `attention_decode` and `rms_norm`
serve decode rows of an fp32 model (its KV cache in fp32 or fp16). `bf16_matmul` serves a bf16 model's projections on
CPUs with AMX or AVX512-BF16 (model/packed_linear.py `Bf16Linear`): one summation order for any number of rows, where
oneDNN's changed with the batch.

Why ctypes and not a torch C++ extension: the C file builds in ~1.5 s with the system C compiler and no PyTorch
headers (an extension against torch's headers takes minutes on 2 cores); the library is linked against libgomp,
which torch has already loaded, so both share one OpenMP runtime and thread pool. A call costs ~6 us.

Built into the smollm cache (`SMOLLM_CACHE_DIR`, see model.files.cache_dir) under a name that hashes the source
and flags, once per machine, under a file lock. Nothing is built on a CPU without AVX2 (or not x86-64), without a
C compiler, or with `SMOLLM_NATIVE_KERNELS=0`; each such case is logged once and the PyTorch paths run.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from model.device import BF16_INSTRUCTIONS, CpuCapability, bf16_instructions_allowed, cpu_capability, onednn_max_isa
from model.files import cache_dir, exclusive_lock

if TYPE_CHECKING:
    from model.kv_cache import CacheBatch, KVCache

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_kernels.c")
# -ffp-contract=off: no product is fused into an add unless the source says so (the rotary embedding then rounds
# as the eager model does, and results do not depend on the compiler's choices).
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
ABI_VERSION = 10
# The 4-bit products' kernels (smollm_q4_isa), by index, chosen by the C code from what the CPU has: vpdpbusd, as
# AVX512-VNNI (AVX-512 CPUs from Cascade Lake and Zen 4 on) or AVX-VNNI (Intel client CPUs from Alder Lake on, which
# have no AVX-512), gives the same integer sums as AVX2's maddubs in fewer instructions. Measured on the AMX Xeon
# (2 threads, 2026-11-30, AVX512-VNNI): a 3072 x 576 product 1.5x (16 rows) to 1.7x (64 rows) faster, a 576 x 1536
# one 1.6-1.8x; one row unchanged (it waits on memory).
Q4_ISAS = ("AVX2", "AVX512-VNNI", "AVX-VNNI")
# The bf16 products' kernels (smollm_bf16_isa), by index: the C code picks AMX tiles, else AVX512-BF16's vdpbf16ps,
# else none (then a bf16 model stays on oneDNN: model/packed_linear.py).
BF16_ISAS = BF16_INSTRUCTIONS
Q4_BLOCK = 32  # weights per 4-bit block
Q4_BLOCK_BYTES = 20  # fp16 scale, fp16 minimum, 16 bytes of nibbles
Q4_GROUP = 8  # weight rows stored interleaved (model/native_kernels.c)
# A packed prompt row runs through `decode_layers` when its prompt chunks have at most FUSED_MAX_ROWS tokens attending
# at most FUSED_MAX_MEAN_KEYS keys on average (`fuses_prompt`): each token attends its keys one row at a time, which
# beats the blocks one by one (their ~60 tensor ops a layer) on short prompts and loses to a causal SDPA on long
# contexts. Measured on the AVX2 EPYC (2 threads, int4, 135M): 16 prompts of 20 tokens 491 ms fused against 676 one
# by one, 32 of 16 737 against 881, one 512-token prompt (256 keys on average) 1028 against 995.
FUSED_MAX_ROWS = 512
FUSED_MAX_MEAN_KEYS = 384
DISABLE_ENV = "SMOLLM_NATIVE_KERNELS"
# The KV cache element types the native attention reads (model/native_kernels.c): fp16 halves what it reads.
KV_DTYPES = (torch.float32, torch.float16)

_P, _I, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES: dict[str, list[Any]] = {
    "smollm_q4_quantize": [_P, _I, _I, _P],
    "smollm_q4_dequantize": [_P, _I, _I, _P, _INT],
    "smollm_q4_matmul": [_P, _I, _I, _P, _I, _P, _P, _INT],
    "smollm_attention_decode": [_P, _I, _I, _I, _I, _P, _P, _P, _P, _INT, _I, _P, _P, _I, _P, _P, _INT],
    # x, rows, dim, n_layer, norms x2, eps, weights x4, heads, kv heads, head_dim, hidden, cos, sin, k, v, kv_half,
    # max_slots, max_len, slots, positions, kv_len, scratch, threads
    "smollm_decode_layers": [_P, _I, _I, _I, _P, _P, _F, _P, _P, _P, _P, _I, _I, _I, _I]
    + [_P, _P, _P, _P, _INT, _I, _I, _P, _P, _I, _P, _INT],
    "smollm_rms_norm": [_P, _I, _I, _P, _F, _P],
    "smollm_bf16_pack": [_P, _I, _I, _P],
    "smollm_bf16_matmul": [_P, _I, _I, _P, _I, _P, _P, _INT],
}


def supported(capability: CpuCapability) -> bool:
    """Whether the kernels can run here: an x86-64 CPU with AVX2 (FMA and F16C come with every AVX2 CPU)."""
    return platform.machine() in ("x86_64", "AMD64") and capability.isa in ("AVX2", "AVX512")


def compiler() -> str | None:
    """`CC` if set, else the first of cc, gcc, clang on PATH."""
    env = os.environ.get("CC")
    if env:
        return shutil.which(env)
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def library_path(cache: Path) -> Path:
    """Where the library built from this source with these flags lies in `cache` (it may not be there yet)."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    return cache / f"native-kernels-{key}.so"


def build(cache: Path, cc: str) -> Path:
    """Compile the kernels into `cache` with `cc` (once: the name hashes the source and flags) and return the
    library's path. Raises RuntimeError with the compiler's message if the build fails."""
    target = library_path(cache)
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache / ".native-kernels.lock"):
        if target.is_file():
            return target
        fd, tmp = tempfile.mkstemp(prefix=".native-kernels-", suffix=".so", dir=cache)
        os.close(fd)
        try:
            done = subprocess.run(
                [cc, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300
            )
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {done.stderr.strip()[-2000:]}")
            os.replace(tmp, target)  # readers see the whole library or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.smollm_abi_version() != ABI_VERSION or lib.smollm_block_bytes() != Q4_BLOCK_BYTES:
        raise RuntimeError(f"{path}: built from another version of {SOURCE.name}")
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    lib.smollm_decode_layer_scratch.argtypes = [_I] * 8
    lib.smollm_decode_layer_scratch.restype = _I
    lib.smollm_attention_scratch.argtypes = [_I] * 5
    lib.smollm_attention_scratch.restype = _I
    lib.smollm_q4_isa.argtypes = []
    lib.smollm_q4_isa.restype = _INT
    lib.smollm_q4_set_isa.argtypes = [_INT]
    lib.smollm_q4_set_isa.restype = _INT
    lib.smollm_bf16_isa.argtypes = []
    lib.smollm_bf16_isa.restype = _INT
    lib.smollm_bf16_set_isa.argtypes = [_INT]
    lib.smollm_bf16_set_isa.restype = _INT
    lib.smollm_bf16_packed_elems.argtypes = [_I, _I]
    lib.smollm_bf16_packed_elems.restype = _I
    return lib


def q4_isa_within(best: str, torch_isa: str) -> str:
    """The 4-bit kernel to run when the CPU's best is `best` and torch dispatches at `torch_isa`: AVX512-VNNI only
    where torch runs AVX-512 code too, so that torch kept to AVX2 on an AVX-512 CPU (ATEN_CPU_CAPABILITY=avx2, to
    approximate an AVX2-only machine) keeps these kernels to AVX2 as well and a run labelled AVX2 runs AVX2 code.
    AVX-VNNI is VEX code of the AVX2 class: a CPU whose best it is (Alder Lake) has no AVX-512 for torch either."""
    return "AVX2" if best == "AVX512-VNNI" and torch_isa != "AVX512" else best


def bf16_isa_within(best: str, max_isa: str | None) -> str:
    """The bf16 kernel to run when the CPU's best is `best` (one of BF16_ISAS) and oneDNN is kept to `max_isa`
    (ONEDNN_MAX_CPU_ISA; None: unrestricted): never above what oneDNN may use, so that a run kept to
    AVX512_CORE_BF16 on an AMX CPU (approximating Cooper Lake or Zen 4) runs the AVX512-BF16 kernel."""
    return min(best, bf16_instructions_allowed(max_isa), key=BF16_ISAS.index)


def q4_isa() -> str | None:
    """The instruction set the 4-bit products run on (one of Q4_ISAS: the best this CPU has), None without the
    kernels."""
    lib = native_kernels()
    return None if lib is None else Q4_ISAS[lib.smollm_q4_isa()]


def set_q4_isa(isa: str) -> str:
    """Pins the 4-bit products to `isa` (one of Q4_ISAS; for tests and measurements: all give the same bits) and
    returns the one in use: unchanged when the CPU (or the compiler that built the kernels) lacks `isa`."""
    lib = native_kernels()
    if lib is None:
        raise RuntimeError("native CPU kernels unavailable here")
    return Q4_ISAS[lib.smollm_q4_set_isa(Q4_ISAS.index(isa))]


@functools.cache
def native_kernels(capability: Callable[[], CpuCapability] = cpu_capability) -> ctypes.CDLL | None:
    """The kernels, built and loaded on first call; None (logged once) where they cannot run here."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        log.info("native CPU kernels off (%s=0): PyTorch kernels only", DISABLE_ENV)
        return None
    cap = capability()
    if not supported(cap):
        log.info("native CPU kernels need x86-64 with AVX2 (%s, %s): PyTorch kernels only", platform.machine(), cap.isa)
        return None
    cache = cache_dir()
    path = library_path(cache)
    try:
        if not path.is_file():  # a library built before (the server image's) needs no compiler
            cc = compiler()
            if cc is None:
                log.warning("no C compiler (cc, gcc or clang; or set CC): native CPU kernels off, PyTorch kernels only")
                return None
            path = build(cache, cc)
        lib = load(path)
        lib.smollm_q4_set_isa(Q4_ISAS.index(q4_isa_within(Q4_ISAS[lib.smollm_q4_isa()], cap.isa)))
        lib.smollm_bf16_set_isa(BF16_ISAS.index(bf16_isa_within(BF16_ISAS[lib.smollm_bf16_isa()], onednn_max_isa())))
        log.info(
            "native CPU kernels loaded: 4-bit products on %s, bf16 products on %s",
            Q4_ISAS[lib.smollm_q4_isa()],
            BF16_ISAS[lib.smollm_bf16_isa()],
        )
        return lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("native CPU kernels unavailable, PyTorch kernels only: %s", e)
        return None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether a native kernel may replace the PyTorch ops on these tensors: all fp32 on the CPU, outside autograd
    (the kernels have no backward) and outside torch.compile (which cannot trace a ctypes call), with the kernels
    built here."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return False
    return native_kernels() is not None


def cache_usable(cache: torch.Tensor) -> bool:
    """Whether the native attention reads and writes this KV cache tensor: fp32 or fp16 (KV_DTYPES), on the CPU."""
    return cache.dtype in KV_DTYPES and cache.device.type == "cpu"


def kv_half(cache: torch.Tensor) -> int:
    """The C kernels' flag for a KV cache tensor's element type: 1 for fp16, 0 for fp32."""
    if not cache_usable(cache):
        raise ValueError(f"native attention: KV cache of {cache.dtype} on {cache.device}, expected one of {KV_DTYPES}")
    return int(cache.dtype == torch.float16)


def fuses_prompt(tokens: int, keys: int) -> bool:
    """Whether `tokens` prompt tokens attending `keys` keys in all run faster as independent rows (the fused
    layers) than as causal blocks: at most FUSED_MAX_ROWS of them, at most FUSED_MAX_MEAN_KEYS keys on average."""
    return tokens <= FUSED_MAX_ROWS and keys <= FUSED_MAX_MEAN_KEYS * tokens


def token_rows(batch: CacheBatch | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each token's (slot, position), (N,) each, when the tokens of `x` (B, T, dim) under `batch` can run as
    independent rows on the native kernels: decode rows (one token per row), or a packed row whose prompt chunks
    (its segments of more than one token) `fuses_prompt` accepts; each token attends its own slot's keys up to
    its position, the keys of the whole step being written first, which is causal attention within each prompt.
    One-token segments (the decode rows of a mixed step) always fit, as they do in a decode step. None
    otherwise."""
    if batch is None or batch.slots is None or not usable(x) or not cache_usable(batch.cache.k):
        return None
    positions = batch.positions.reshape(-1)
    if batch.segments is None:
        fits = x.shape[1] == 1
    else:
        at = positions.tolist()
        prompt = [p for seg in batch.segments if seg.end - seg.start > 1 for p in at[seg.start : seg.end]]
        fits = fuses_prompt(len(prompt), sum(prompt) + len(prompt))
    return (batch.slots, positions) if fits else None


def q4_layer_blocks(*layers: torch.nn.Module) -> list[torch.Tensor] | None:
    """The 4-bit blocks of `layers` when every one is a native-kernel int4 layer (model.quant.Int4Linear), else None."""
    blocks = [
        getattr(layer, "blocks", None) if getattr(layer, "kernel", None) == "native" else None for layer in layers
    ]
    return None if any(b is None for b in blocks) else cast(list[torch.Tensor], blocks)


def fused_blocks(blocks: Iterable[Any]) -> bool:
    """Whether `decode_layers` runs these transformer blocks (every projection a native int4 layer)."""
    return all(
        q4_layer_blocks(b.attention.wqkv, b.attention.wo, b.feed_forward.w13, b.feed_forward.w2) is not None
        for b in blocks
    )


def decode_layers(
    x: torch.Tensor,
    blocks: Iterable[Any],
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache,
    rows: tuple[torch.Tensor, torch.Tensor],
    kv_len: int,
) -> torch.Tensor | None:
    """Every transformer block (model.llama.TransformerBlock) for the tokens of x (B, T, dim) fp32 as independent
    rows (`rows`: each token's slot and position, from `token_rows`) in one native call, or None (nothing computed)
    unless all their projections are native int4 layers: what the blocks compute, without the ~60 tensor ops and the
    Python around each (~4 ms of a 15 ms one-token step of the 135M model, ~30 ms of a 24-token prompt's 103 ms).
    cos, sin (B, T, 1, head_dim); every position below kv_len. Returns the new (B, T, dim); x is not modified."""
    lib = _require()
    layers = list(blocks)
    ptrs: dict[str, list[int]] = {name: [] for name in ("attn_norm", "ffn_norm", "wqkv", "wo", "w13", "w2")}
    for layer in layers:
        attn, ffn = layer.attention, layer.feed_forward
        weights = q4_layer_blocks(attn.wqkv, attn.wo, ffn.w13, ffn.w2)
        if weights is None:
            return None
        ptrs["attn_norm"].append(layer.attention_norm.weight.data_ptr())
        ptrs["ffn_norm"].append(layer.ffn_norm.weight.data_ptr())
        for name, b in zip(("wqkv", "wo", "w13", "w2"), weights, strict=True):
            ptrs[name].append(b.data_ptr())
    first = layers[0]
    n_head, n_kv_head = first.attention.n_head, first.attention.n_kv_head
    hidden, eps = first.feed_forward.intermediate_size, first.attention_norm.eps
    # Held in locals until the call returns: a temporary's memory could be freed and reused before the C code reads it.
    slots, positions = rows[0].contiguous(), rows[1].contiguous()
    _, max_slots, _, max_len, head_dim = cache.k.shape
    _check_rows(slots, positions, max_slots, max_len, kv_len)
    n, dim = slots.shape[0], x.shape[-1]
    cos_rows, sin_rows = cos.reshape(n, -1).contiguous(), sin.reshape(n, -1).contiguous()
    out = x.reshape(n, dim).clone()
    threads = _threads()
    scratch = cache.scratch(
        lib.smollm_decode_layer_scratch(n, dim, n_head, n_kv_head, head_dim, hidden, kv_len, threads)
    )
    arrays = {name: (ctypes.c_void_p * len(p))(*p) for name, p in ptrs.items()}
    lib.smollm_decode_layers(
        out.data_ptr(),
        n,
        dim,
        len(layers),
        arrays["attn_norm"],
        arrays["ffn_norm"],
        eps,
        arrays["wqkv"],
        arrays["wo"],
        arrays["w13"],
        arrays["w2"],
        n_head,
        n_kv_head,
        head_dim,
        hidden,
        cos_rows.data_ptr(),
        sin_rows.data_ptr(),
        cache.k.data_ptr(),
        cache.v.data_ptr(),
        kv_half(cache.k),
        max_slots,
        max_len,
        slots.data_ptr(),
        positions.data_ptr(),
        kv_len,
        scratch.data_ptr(),
        threads,
    )
    return out.view(x.shape)


def _check_rows(slots: torch.Tensor, positions: torch.Tensor, max_slots: int, max_len: int, kv_len: int) -> None:
    """The C code indexes the cache and its scratch with these without checking: a slot or position out of range
    would write outside them. A few microseconds on the CPU; raises ValueError."""
    if slots.dtype != torch.long or positions.dtype != torch.long or slots.shape != positions.shape:
        raise ValueError("native rows: slots and positions must be int64 tensors of one shape")
    if slots.numel() and not (
        0 <= int(slots.min()) <= int(slots.max()) < max_slots
        and 0 <= int(positions.min()) <= int(positions.max()) < min(kv_len, max_len)
    ):
        raise ValueError(f"native rows: a slot or position outside the cache ({max_slots} slots, kv_len {kv_len})")


def _threads() -> int:
    return torch.get_num_threads()


def q4_quantize(weight: torch.Tensor) -> torch.Tensor:
    """4-bit blocks of an fp32 weight (out, in), in a multiple of 32: (ceil(out / 8), in / 32 * 160) uint8, rows
    interleaved by 8 (model/native_kernels.c)."""
    lib = _require()
    w = weight.detach().float().contiguous()
    n, k = w.shape
    if k % Q4_BLOCK or k <= 0:
        raise ValueError(f"q4: in_features {k} must be a positive multiple of {Q4_BLOCK}")
    blocks = torch.empty(-(-n // Q4_GROUP), k // Q4_BLOCK * Q4_BLOCK_BYTES * Q4_GROUP, dtype=torch.uint8)
    lib.smollm_q4_quantize(w.data_ptr(), n, k, blocks.data_ptr())
    return blocks


def q4_dequantize(blocks: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The fp32 weight (out, in) that `blocks` stand for."""
    lib = _require()
    w = torch.empty(out_features, in_features)
    lib.smollm_q4_dequantize(blocks.data_ptr(), out_features, in_features, w.data_ptr(), _threads())
    return w


def q4_matmul(x: torch.Tensor, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (rows, in) fp32 contiguous @ W.T, W (out, in) in 4-bit blocks: (rows, out) fp32."""
    lib = _require()
    rows, k = x.shape
    y = torch.empty(rows, out_features)
    scratch = torch.empty(rows * (k // 4 + 2 * k // Q4_BLOCK))
    lib.smollm_q4_matmul(
        x.data_ptr(), rows, k, blocks.data_ptr(), out_features, y.data_ptr(), scratch.data_ptr(), _threads()
    )
    return y


def attention_decode(
    qkv: torch.Tensor,
    n_head: int,
    n_kv_head: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    kv_len: int,
) -> torch.Tensor:
    """One decode token per row: rotate the queries and keys of `qkv` (rows, (n_head + 2 n_kv_head) head_dim),
    write keys and values into a layer's cache (max_slots, n_kv_head, max_len, head_dim) at (slots[r], positions[r]),
    and attend each row's keys 0..positions[r] (every position below kv_len). cos, sin (rows, head_dim); all fp32 and
    contiguous but the cache (fp32 or fp16, KV_DTYPES), slots and positions (rows,) int64. Returns
    (rows, n_head * head_dim)."""
    lib = _require()
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"native attention: keys in {k_cache.dtype}, values in {v_cache.dtype}")
    rows = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    max_len = k_cache.shape[-2]
    _check_rows(slots, positions, k_cache.shape[0], max_len, kv_len)
    out = torch.empty(rows, n_head * head_dim)
    threads = _threads()
    scratch = torch.empty(lib.smollm_attention_scratch(rows, n_head, head_dim, kv_len, threads))
    lib.smollm_attention_decode(
        qkv.data_ptr(),
        rows,
        n_head,
        n_kv_head,
        head_dim,
        cos.data_ptr(),
        sin.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        kv_half(k_cache),
        max_len,
        slots.data_ptr(),
        positions.data_ptr(),
        kv_len,
        out.data_ptr(),
        scratch.data_ptr(),
        threads,
    )
    return out


def bf16_isa() -> str | None:
    """The instruction set `bf16_matmul` runs on here ("AMX" or "AVX512-BF16": the best this CPU has, within what
    oneDNN may use), None where it cannot run (no AVX512-BF16, or no kernels)."""
    lib = native_kernels()
    isa = None if lib is None else BF16_ISAS[lib.smollm_bf16_isa()]
    return None if isa in (None, "none") else isa


def set_bf16_isa(isa: str) -> str:
    """Pins the bf16 products to `isa` (one of BF16_ISAS; for tests and measurements) and returns the one in use:
    unchanged when the CPU (or the compiler that built the kernels) lacks `isa`. Weights packed before run on
    either: the layout is the same."""
    lib = _require()
    return BF16_ISAS[lib.smollm_bf16_set_isa(BF16_ISAS.index(isa))]


BF16_K_MULTIPLE = 32  # inputs per AMX tile step: a weight's in_features must be a multiple


def bf16_pack(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 (n, k) weight in the layout `bf16_matmul` reads (model/native_kernels.c), k a multiple of 32."""
    lib = _require()
    n, k = weight.shape
    if weight.dtype != torch.bfloat16 or k % BF16_K_MULTIPLE:
        raise ValueError(f"bf16_pack: a bf16 weight with in_features a multiple of 32, got {weight.dtype} {n}x{k}")
    # Checked once here, where a layer is built, not per product: bf16_matmul computes nothing without a kernel.
    if bf16_isa() is None:
        raise RuntimeError("bf16_pack: this CPU (or compiler build) has neither AMX-BF16 nor AVX512-BF16 for it")
    w = weight.detach().contiguous()
    out = torch.empty(lib.smollm_bf16_packed_elems(n, k), dtype=torch.bfloat16)
    lib.smollm_bf16_pack(w.data_ptr(), n, k, out.data_ptr())
    return out


def bf16_matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (rows, k) bf16 contiguous @ W.T for W packed by `bf16_pack`: (rows, out_features) bf16, every output summed
    in one order whatever the rows (a row's result does not depend on its batch). Only where `bf16_isa()`."""
    lib = _require()
    rows, k = x.shape
    if (
        x.dtype != torch.bfloat16
        or not x.is_contiguous()
        or packed.numel() != lib.smollm_bf16_packed_elems(out_features, k)
    ):
        raise ValueError(f"bf16_matmul: x must be contiguous bf16 matching the packed weight, got {x.dtype} {rows}x{k}")
    threads = _threads()
    y = torch.empty(rows, out_features, dtype=torch.bfloat16)
    # The AMX kernel's zero-padded last row tile, per thread; the AVX512-BF16 kernel reads none.
    amx = lib.smollm_bf16_isa() == BF16_ISAS.index("AMX")
    pad = torch.empty(threads * 16 * k if amx else 0, dtype=torch.bfloat16)
    lib.smollm_bf16_matmul(
        x.data_ptr(), rows, k, packed.data_ptr(), out_features, y.data_ptr(), pad.data_ptr(), threads
    )
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension; x fp32 contiguous, weight fp32 (dim,)."""
    lib = _require()
    y = torch.empty_like(x)
    dim = x.shape[-1]
    lib.smollm_rms_norm(x.data_ptr(), x.numel() // dim, dim, weight.data_ptr(), eps, y.data_ptr())
    return y


def _require() -> ctypes.CDLL:
    lib = native_kernels()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available on this machine (see the log)")
    return lib


def main() -> None:
    """`python -m model.native`: build the kernels now (an image build does, so a container never compiles at
    start-up) and say where they are, or why there are none."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lib = native_kernels()
    if lib is None:
        print("native CPU kernels: not available here (see above); the PyTorch kernels serve")
        return
    print(f"native CPU kernels: {lib._name}")


if __name__ == "__main__":
    main()
