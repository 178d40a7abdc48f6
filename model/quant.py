"""Weight-only quantized linear layers for serving on the CPU: `quantize_model(model, "int8" | "int4")`.

int8 is symmetric per output channel; int4 is asymmetric in groups of 32 along the input (a scale and a zero per
group, llama.cpp's Q4_1 layout). Activations stay in the model's compute dtype; the norms, attention, the KV cache
and the embedding table are untouched. Every linear layer is quantized, and so is the output projection: it is
tied to the embedding, so it gets its own quantized copy (int8 in both modes) and the table keeps the compute
dtype.

int4 has two kernels (`Int4Linear`, chosen by `pick_int4_kernel`): this project's AVX2 kernels (model/native.py)
wherever they build (every x86-64 CPU with AVX2, AVX-512 ones included), in an fp32 model (`serving_dtype`), and
PyTorch's `aten._weight_int4pack_mm_for_cpu` elsewhere. int8 has two (`Int8Linear`, chosen by `pick_int8_kernel`):
fbgemm's dynamic-quantized GEMM (shipped in torch's x86 builds, reached through torch.ao's deprecated quantized ops)
wherever torch has it, `aten._weight_int8pack_mm` elsewhere.
torchao 0.18 (the release for torch 2.13) ships no CPU kernels of its own: its int4 CPU layout calls the same aten
kernel and its int8 weight-only path dequantizes the whole weight before a plain matmul.

Measured on the AVX2-only EPYC (bench/README.md, 2026-11-29), one decode step of the 135M model relative to fp32
packed: the aten kernels' fp32-input path is their slow path (int8 1.7x, int4 2.6x slower than fp32 packed),
while bf16 inputs (the kernels widen them to fp32 inside, so bf16 being emulated on that CPU does not matter)
make int8 0.64x and int4 0.36x of it. So an fp32 model hands the aten kernels bf16 activations and takes fp32
results back. fbgemm keeps the activations in fp32 (about 14 bits reach the integer products, see `Int8Linear`):
+0.16% perplexity against aten's +0.49%, and at 16 rows a decode step 0.68-0.77x of aten int8's; the 49152-row output
projection 8.1 -> 3.5 ms for one row and 60 -> 13 ms for 16 (1 thread, loaded machine, 2026-11-30).

A Q4_1 GGUF (the embedded model) needs no special path: its blocks are 32 wide with a scale and a minimum, and
every block spans the full 0..15 range, so requantizing the dequantized weights here reproduces them exactly
(measured: 0 of 3,317,760 groups differ).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from model import native
from model.device import CpuCapability, cpu_capability, resolve_dtype
from model.packed_linear import Bf16Linear, PackedLinear

QUANT_MODES = ("none", "int8", "int4")
INT8_KERNELS = ("aten", "fbgemm")
INT4_KERNELS = ("aten", "native")
# fbgemm (reduce_range, as AVX2's u8 x s8 products need) quantizes to 0..127: a range of +-63.5 makes its scale 1
# and every integer in -63..63 exact. Rows are scaled to +-63 and remainders (at most 0.5) by 126, so that rounding
# in the division never pushes a value past the bound (which would change the scale for the whole batch).
FBGEMM_BOUND = 63.5
FBGEMM_STEPS = 63.0
FBGEMM_REMAINDER = 126.0
# The largest row count whose fbgemm input buffer a layer keeps between calls (decode batches; prefills allocate).
FBGEMM_REUSE_ROWS = 64
INT4_GROUP_SIZE = 32
# In int4 mode the output projection stays int8, as in llama.cpp's own Q4 files (the embedded GGUF keeps it Q8_0):
# measured on the held-out text, int4 everywhere costs +6.2% perplexity over fp32, above the +5% bound; the
# 49152-row projection alone is 9% off in int4 against 1.2% in int8 (relative Frobenius error).
OUTPUT_PROJECTION = "output"


def kernel_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The activation dtype the weight-only kernels are fed for a model computing in `compute_dtype`: bf16 and
    fp16 as they are; fp32 as bf16, because the kernels' fp32 path is not vectorised (see the module doc)."""
    return compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T with q int8 (out, in) and one scale per output row (symmetric, max-abs / 127).

    Two kernels compute it (`INT8_KERNELS`). `aten` is `aten._weight_int8pack_mm` on `act_dtype` activations (bf16
    for an fp32 model, see `kernel_dtype`). `fbgemm` is fbgemm's dynamic-quantized GEMM (`quantized::linear_dynamic`,
    integer dot products, fp32 around them: fast on AVX2, where bf16 is emulated), fed so that it neither loses
    precision nor couples the rows of a batch:
    - fbgemm quantizes its whole input with one 7-bit scale from the input's min and max. Two constant columns
      +-FBGEMM_BOUND (against zero weights) fix that range, and each row is scaled by its own max-abs into it, so
      the scale is always 1 and a row's result never depends on the rows batched with it (a greedy request must
      give the same tokens alone and in a batch); the integer products are exact, so rows are bit-identical.
    - 7 bits per row cost +13% perplexity on the 135M model (outlier channels), so each row goes in twice: its
      integer part k = round(u) and its remainder (u - k) scaled up by FBGEMM_REMAINDER, in one GEMM of 2x the rows
      (as cheap as one row while the weights stream from memory): about 14 bits per activation.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    _bounds: torch.Tensor  # (1, 2): +-FBGEMM_BOUND, fbgemm only

    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype, kernel: str = "aten") -> None:
        super().__init__()
        if kernel not in INT8_KERNELS:
            raise ValueError(f"int8 kernel: expected one of {', '.join(INT8_KERNELS)}, got {kernel!r}")
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.act_dtype = act_dtype
        self.kernel = kernel
        self.register_buffer("qweight", q.contiguous())
        if kernel == "fbgemm":
            # fbgemm's epilogue multiplies by the fp32 scale; the aten kernel takes it in the activation dtype.
            self.register_buffer("scales", scale)
            # A plain attribute, not a buffer: fbgemm's packed weight is an opaque object (as in PackedLinear).
            self.packed = _fbgemm_pack(q, scale)
            self.register_buffer("_bounds", torch.tensor([[FBGEMM_BOUND, -FBGEMM_BOUND]]), persistent=False)
            self._fbgemm_buffer: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        else:
            self.register_buffer("scales", scale.to(act_dtype))

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "fbgemm":
            rows = x2.shape[0]
            xf = x2 if x2.dtype == torch.float32 else x2.float()
            # unit (rows, 1): u = x / unit spans [-FBGEMM_STEPS, FBGEMM_STEPS], so round(u) needs no clamp; the
            # clamp on unit keeps an all-zero row (padding) zero instead of NaN.
            unit = torch.linalg.vector_norm(xf, float("inf"), dim=1, keepdim=True).clamp_(min=1e-30).div_(FBGEMM_STEPS)
            u = xf / unit
            inp, whole, rest = self._fbgemm_input(rows)  # (2 rows, in + 2) and its two (rows, in) halves
            torch.round(u, out=whole)  # integers in -63..63: fbgemm quantizes them exactly
            torch.sub(u, whole, out=rest).mul_(FBGEMM_REMAINDER)  # |u - round(u)| <= 0.5: inside the bound
            y2 = torch.ops.quantized.linear_dynamic(inp, self.packed, True)
            y = torch.add(y2[:rows], y2[rows:], alpha=1.0 / FBGEMM_REMAINDER).mul_(unit)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(self.act_dtype), self.qweight, self.scales)
        y = y.view(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _fbgemm_input(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fbgemm's input for `rows` rows with the bound columns filled in, and views of its two halves. Decode
        steps repeat the same row count, so the last one (up to FBGEMM_REUSE_ROWS) is kept: a step then allocates
        nothing here and skips two concatenations. Made outside inference mode, so that a model run under
        inference_mode and later under no_grad may still write into it. One layer must not run on two threads at once
        (the engine runs a model on its one thread)."""
        cached = self._fbgemm_buffer
        if cached is not None and cached[1].shape[0] == rows:
            return cached
        with torch.inference_mode(False):
            inp = torch.empty(2 * rows, self.in_features + 2)
            inp[:, self.in_features :] = self._bounds
        views = (inp, inp[:rows, : self.in_features], inp[rows:, : self.in_features])
        if rows <= FBGEMM_REUSE_ROWS:
            self._fbgemm_buffer = views
        return views

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, {self.kernel}"


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor) -> torch.ScriptObject:
    """fbgemm's packed form of int8 weights `q` (out, in) with per-row `scale`, two zero columns appended for the
    activation bounds (see Int8Linear)."""
    padded = torch.cat([q, q.new_zeros(q.shape[0], 2)], dim=1)
    with warnings.catch_warnings():
        # torch.ao's quantized tensors are deprecated, but fbgemm's kernels are only reachable through them.
        warnings.simplefilter("ignore")
        zeros = torch.zeros(q.shape[0], dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(padded, scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


class Int4Linear(nn.Module):
    """y = x @ W.T with W[n, k] = q[n, k] * scale[n, g] + min[n, g], q in 0..15, g = k // group_size (asymmetric
    min/max groups, as llama.cpp's Q4_1).

    Two kernels (`INT4_KERNELS`, chosen by `pick_int4_kernel`):
    - `native`: model/native.py's AVX2 kernel, on llama.cpp's Q4_1 blocks (fp16 scale and minimum, groups of 32)
      with fp32 activations, for any number of rows: on the AVX2 EPYC its 8-bit products beat dequantize + fp32
      GEMM at every size measured (1 to 256 rows, bench/README.md), and a row's result never depends on the others.
    - `aten`: PyTorch's `_weight_int4pack_mm_for_cpu` in its packed layout, which writes a group as
      (q - 8) * scale + zero (so zero = min + 8 * scale), on `act_dtype` activations.
    """

    blocks: torch.Tensor  # native: (ceil(out / 8), in / 32 * 160) uint8, model/native.py's layout

    def __init__(
        self,
        weight: torch.Tensor,
        act_dtype: torch.dtype,
        group_size: int = INT4_GROUP_SIZE,
        kernel: str = "aten",
    ) -> None:
        super().__init__()
        if kernel not in INT4_KERNELS:
            raise ValueError(f"int4 kernel: expected one of {', '.join(INT4_KERNELS)}, got {kernel!r}")
        w = weight.detach().float()
        N, K = w.shape
        if K % group_size:
            raise ValueError(f"int4: in_features {K} is not a multiple of the group size {group_size}")
        self.out_features, self.in_features, self.group_size = N, K, group_size
        self.act_dtype = act_dtype
        self.kernel = kernel
        if kernel == "native":
            if group_size != native.Q4_BLOCK:
                raise ValueError(f"int4 native kernel: groups of {native.Q4_BLOCK} only, got {group_size}")
            self.register_buffer("blocks", native.q4_quantize(w))
            return
        if N % 16:
            raise ValueError(f"int4: out_features {N} is not a multiple of 16 (the CPU kernel's packing)")
        wg = w.view(N, K // group_size, group_size)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, groups)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(N, K)
        zero = lo + 8.0 * scale
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # (groups, N, 2): the kernel's layout.
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(act_dtype))

    def dequantize(self) -> torch.Tensor:
        """The weight the kernel computes with, (out, in) fp32 (for tests and quality checks)."""
        if self.kernel == "native":
            return native.q4_dequantize(self.blocks, self.out_features, self.in_features)
        eye = torch.eye(self.in_features, dtype=self.act_dtype)
        return (
            torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_and_zeros)
            .float()
            .t()
            .contiguous()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "native":
            y = native.q4_matmul(x2.float().contiguous(), self.blocks, self.out_features)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(self.act_dtype), self.packed, self.group_size, self.scales_and_zeros
            )
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}, "
            f"{self.kernel}"
        )


class NonFiniteWeightsError(ValueError):
    """Weights holding NaN or infinity, found before quantizing: a quantized copy would hide them (a NaN can round
    into an ordinary 4-bit code), so a checkpoint the server must refuse would look finite after loading."""

    def __init__(self, names: list[str]) -> None:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        super().__init__(f"non-finite weights in {', '.join(names[:3])}{more}")
        self.names = names


def all_finite(t: torch.Tensor) -> bool:
    """Whether `t` holds no NaN and no infinity. Either makes the sum non-finite, so a finite sum proves the tensor
    finite in one cheap reduction; only a sum that is not (a non-finite element, or finite ones overflowing) is
    checked element by element. The elementwise check of every weight took 2 s of a hot reload's CPU time on the
    135M model (2 cores, shared with the engine serving meanwhile); the sums take ~0.1 s."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def fbgemm_available() -> bool:
    """Whether this torch build has fbgemm's quantized kernels (x86 builds do; ARM and some minimal ones do not)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def pick_int4_kernel(capability: Callable[[], CpuCapability] = cpu_capability) -> str:
    """`native` where model/native.py's kernels run (x86-64 with AVX2 and a C compiler), else `aten`; `capability`
    is a seam for tests.

    Native on CPUs with native bf16 too, by measurement (Xeon with AVX512-BF16 and AMX, 2 threads, 2026-11-30; the
    135M model served in process, 64 greedy tokens): 1 / 16 / 64 streams at 150 / 460 / 508 tok/s on the native
    kernels in an fp32 model, 67.5 / 266 / 350 on aten's kernel in a bf16 model (its fast path)."""
    if not native.supported(capability()) or native.native_kernels() is None:
        return "aten"
    return "native"


def pick_int8_kernel() -> str:
    """`fbgemm` where this torch has it (x86 builds: fp32 activations, integer dot products, rows independent of
    their batch), else `aten`.

    fbgemm on CPUs with native bf16 too, by measurement (Xeon with AMX, 2 threads, 2026-11-30): the 49152 x 576
    output projection took 0.78 / 3.1 / 13.9 ms for 1 / 16 / 64 rows on fbgemm against 1.05 / 7.5 / 29.5 on aten's
    kernel with bf16 activations; served in process, int8 mode on fbgemm in an fp32 model 46.7 / 257 / 405 tok/s at
    1 / 16 / 64 streams against 45.7 / 206 / 308 on aten's kernel in a bf16 model. (oneDNN's packed bf16 GEMM,
    AMX, took 1.3 / 1.5 / 2.5 ms, but its result for a row changes with the number of rows around it.)"""
    return "fbgemm" if fbgemm_available() else "aten"


def serving_dtype(
    setting: str,
    device: torch.device,
    mode: str,
    capability: Callable[[], CpuCapability] = cpu_capability,
) -> torch.dtype:
    """The compute dtype to serve quant `mode` in: `resolve_dtype`'s for `setting`, except that `auto` is fp32, even
    where bf16 is native, when the mode's kernels take fp32 activations: int4 on the native kernels (8-bit inside;
    every block of a step runs in one call only in an fp32 model, model/native.py) and int8 on fbgemm. A bf16 model
    would only add conversions around them: on the AMX Xeon (2 threads, 2026-11-30, in process) int8 served 1 / 16 /
    64 streams at 50.8 / 291 / 452 tok/s in fp32 against 41.5 / 254 / 409 in bf16."""
    dtype = resolve_dtype(setting, device, capability)
    if setting != "auto" or device.type != "cpu":
        return dtype
    if (mode == "int4" and pick_int4_kernel(capability) == "native") or (
        mode == "int8" and pick_int8_kernel() == "fbgemm"
    ):
        return torch.float32
    return dtype


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    mode: str,
    group_size: int = INT4_GROUP_SIZE,
    capability: Callable[[], CpuCapability] = cpu_capability,
    int8_kernel: str | None = None,
    int4_kernel: str | None = None,
) -> int:
    """Replace every linear layer of `model` (the output projection included) with its weight-only `mode`
    counterpart, in place (int4 mode: the output projection in int8, see OUTPUT_PROJECTION); returns how many
    were replaced (0 for `none`). The model must be on the CPU and not
    packed (`model.packed_linear`); quantized layers have no autograd: quantize to serve, never to train. Raises
    NonFiniteWeightsError, replacing nothing, if a linear weight holds NaN or infinity."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quant: expected one of {', '.join(QUANT_MODES)}, got {mode!r}")
    if mode == "none":
        return 0
    weight = next(model.parameters())
    if weight.device.type != "cpu":
        raise ValueError(
            f"quant {mode}: the weight-only kernels used here are CPU kernels; the model is on "
            f"{weight.device.type} (use quant none there)"
        )
    if any(isinstance(m, (PackedLinear, Bf16Linear)) for m in model.modules()):
        raise TypeError("quantize_model: the model's weights are packed (model.packed_linear); quantize before packing")
    act = kernel_dtype(weight.dtype)
    int8_kernel = int8_kernel or pick_int8_kernel()
    int4_kernel = int4_kernel or pick_int4_kernel(capability)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    bad = [f"{name}.weight" for name, m in targets if not all_finite(m.weight)]
    if bad:
        raise NonFiniteWeightsError(bad)
    for name, linear in targets:
        if linear.bias is not None:
            raise ValueError(f"quantize_model: {name} has a bias; only bias-free linear layers are supported")
        w = linear.weight
        if mode == "int8" or name == OUTPUT_PROJECTION:
            layer = Int8Linear(w, act, int8_kernel)
        else:
            layer = Int4Linear(w, act, group_size, int4_kernel)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
    return len(targets)


def linear_kernels(model: nn.Module) -> str:
    """Which kernels run the model's linear layers, each named once in the order first met (the output projection
    last): e.g. "int4 native AVX2, int8 fbgemm", "bf16 native AMX", "oneDNN packed", "torch". The instruction set is
    the one the native kernels use here, so that a result measured with them (or with them off) says so."""
    names: dict[str, None] = {}
    for m in model.modules():
        if isinstance(m, Int4Linear):
            names[f"int4 native {native.q4_isa()}" if m.kernel == "native" else "int4 aten"] = None
        elif isinstance(m, Int8Linear):
            names[f"int8 {m.kernel}"] = None
        elif isinstance(m, Bf16Linear):
            names[f"bf16 native {native.bf16_isa()}"] = None
        elif isinstance(m, PackedLinear):
            names["oneDNN packed"] = None
        elif isinstance(m, nn.Linear):
            names["torch"] = None
    return ", ".join(names)
