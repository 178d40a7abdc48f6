"""Weight-only quantized linear layers for serving on the CPU: `quantize_model(model, "int8" | "int4")`.

int8 is symmetric per output channel; int4 is asymmetric in groups of 32 along the input (a scale and a zero per
group, llama.cpp's Q4_1 layout). Activations stay in the model's compute dtype; the norms, attention, the KV cache
and the embedding table are untouched. Every linear layer is quantized, and so is the output projection: it is
tied to the embedding, so it gets its own quantized copy (int8 in both modes) and the table keeps the compute
dtype.

The kernels are PyTorch's own (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`); torchao 0.18
(the release for torch 2.13) ships no CPU kernels of its own: its int4 CPU layout calls the same aten kernel and
its int8 weight-only path dequantizes the whole weight before a plain matmul. Measured on the AVX2-only EPYC
(bench/README.md, 2026-11-29), one decode step of the 135M model relative to fp32 packed: the kernels' fp32-input
path is their slow path (int8 1.7x, int4 2.6x slower than fp32 packed), while bf16 inputs (the kernels widen them
to fp32 inside, so bf16 being emulated on that CPU does not matter) make int8 0.64x and int4 0.36x of it. So an
fp32 model hands the kernels bf16 activations and takes fp32 results back.

A Q4_1 GGUF (the embedded model) needs no special path: its blocks are 32 wide with a scale and a minimum, and
every block spans the full 0..15 range, so requantizing the dequantized weights here reproduces them exactly
(measured: 0 of 3,317,760 groups differ).
"""

from __future__ import annotations

import torch
from torch import nn

from model.packed_linear import PackedLinear

QUANT_MODES = ("none", "int8", "int4")
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
    """y = x @ (q * scale).T with q int8 (out, in) and one scale per output row (symmetric, max-abs / 127)."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.act_dtype = act_dtype
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scales", scale.to(act_dtype))

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, self.in_features).to(self.act_dtype), self.qweight, self.scales
        )
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    """y = x @ W.T with W[n, k] = q[n, k] * scale[n, g] + min[n, g], q in 0..15, g = k // group_size (asymmetric
    min/max groups, as llama.cpp's Q4_1). Stored in the CPU kernel's packed layout, which writes a group as
    (q - 8) * scale + zero, so zero = min + 8 * scale."""

    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype, group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__()
        w = weight.detach().float()
        N, K = w.shape
        if K % group_size:
            raise ValueError(f"int4: in_features {K} is not a multiple of the group size {group_size}")
        if N % 16:
            raise ValueError(f"int4: out_features {N} is not a multiple of 16 (the CPU kernel's packing)")
        self.out_features, self.in_features, self.group_size = N, K, group_size
        wg = w.view(N, K // group_size, group_size)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, groups)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(N, K)
        zero = lo + 8.0 * scale
        self.act_dtype = act_dtype
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # (groups, N, 2): the kernel's layout.
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(act_dtype))

    def dequantize(self) -> torch.Tensor:
        """The weight the kernel computes with, (out, in) fp32 (for tests and quality checks)."""
        eye = torch.eye(self.in_features, dtype=self.act_dtype)
        return (
            torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_and_zeros)
            .float()
            .t()
            .contiguous()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(self.act_dtype), self.packed, self.group_size, self.scales_and_zeros
        )
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = INT4_GROUP_SIZE) -> int:
    """Replace every linear layer of `model` (the output projection included) with its weight-only `mode`
    counterpart, in place (int4 mode: the output projection in int8, see OUTPUT_PROJECTION); returns how many
    were replaced (0 for `none`). The model must be on the CPU and not
    packed (`model.packed_linear`); quantized layers have no autograd: quantize to serve, never to train."""
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
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        raise TypeError("quantize_model: the model's weights are packed for oneDNN; quantize before packing")
    act = kernel_dtype(weight.dtype)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        if linear.bias is not None:
            raise ValueError(f"quantize_model: {name} has a bias; only bias-free linear layers are supported")
        w = linear.weight
        if mode == "int8" or name == OUTPUT_PROJECTION:
            layer = Int8Linear(w, act)
        else:
            layer = Int4Linear(w, act, group_size)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
    return len(targets)
