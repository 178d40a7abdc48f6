"""Inference-only linear layers whose weights oneDNN has reordered once, at load time, into its own blocked layout.

`F.linear` on CPU hands oneDNN a plain (out, in) weight on every call, and oneDNN's kernels then read it in an
order that streams memory poorly. Packing it once is what PyTorch's own inference paths do (torch.compile with
freezing, IPEX). Measured on the 2-core EPYC, bf16, the 135M model: the 30 layers' projections for one decode
token 8.9 -> 6.0 ms (24 -> 35 GB/s), for 16 tokens 11.8 -> 8.2 ms; the 49152-row output projection 1.96 ->
0.59 ms for one token. bf16 results are bit-identical to `F.linear`'s; in fp32 they differ in rounding only.

A packed layer has no autograd and no `weight` in the state dict: pack a model to serve it, never to train or
save it. The tied output projection gets its own packed copy; the embedding keeps the original.

bf16 on a CPU with AMX or AVX512-BF16 is packed for this project's own bf16 kernels instead (`Bf16Linear`,
model/native.py): oneDNN's bf16 kernel changes with the number of rows (measured on AMX: up to 32 rows one summation
order, more rows another; on AVX512-BF16 alone, 2 rows already differ from 1), so a row's result, and a greedy
request's tokens, changed with its batch (4 of 8 requests in a batch of 64). Ours sum in one order for any number
of rows. On AMX they were also faster for decode batches: the 135M model's projections for 1 / 16 / 64 rows took
16.7 / 16.7 / 27.8 ms against oneDNN's 23.6 / 25.7 / 32.8 (320 rows, a burst of prompts: 79.0 against 66.0).
"""

from __future__ import annotations

import torch
from torch import nn

from model import native

# oneDNN picks the blocked layout for this many rows; 16 (a full decode batch) gave the best layout for 1, 16 and
# 512 rows alike, and in fp32 the only one whose rows came out the same whatever the batch around them.
PACK_ROWS_HINT = 16


class PackedLinear(nn.Module):
    packed: torch.Tensor  # oneDNN's opaque blocked layout
    in_features: int
    out_features: int

    def __init__(self, linear: nn.Linear, rows_hint: int = PACK_ROWS_HINT) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear packs bias-free layers only")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # A plain attribute, not a buffer: an opaque oneDNN tensor cannot be moved, cast or saved.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [None], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


class Bf16Linear(nn.Module):
    """A bias-free bf16 linear layer on this project's bf16 kernel (model/native.py `bf16_matmul`, on AMX or
    AVX512-BF16): each output summed in one order whatever the rows, so a row's result does not depend on its
    batch."""

    packed: torch.Tensor
    in_features: int
    out_features: int

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Bf16Linear packs bias-free layers only")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # A plain attribute, not a buffer: the packed layout is not a checkpoint's.
        self.packed = native.bf16_pack(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        return native.bf16_matmul(rows, self.packed, self.out_features).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for bf16_matmul"


def bf16_kernel_packs(model: nn.Module) -> bool:
    """Whether `pack_linears` puts this model's linear layers on the bf16 kernel: bf16 on a CPU where it runs, and
    every layer's in_features a multiple of its 32-input step (all or none, so that no layer keeps oneDNN's
    batch-dependent sums)."""
    weight = next(model.parameters())
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or native.bf16_isa() is None:
        return False
    return all(m.in_features % native.BF16_K_MULTIPLE == 0 for m in model.modules() if isinstance(m, nn.Linear))


def can_pack(model: nn.Module) -> bool:
    """Whether this PyTorch build packs the model's weights: CPU tensors, oneDNN, and bf16 support for bf16."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return weight.dtype == torch.float32


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` in `model` with a `Bf16Linear` (`bf16_kernel_packs`) or a `PackedLinear`, in place;
    returns how many were packed (0 when `can_pack` says no)."""
    own = bf16_kernel_packs(model)
    if not own and not can_pack(model):
        return 0
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, Bf16Linear(linear) if own else PackedLinear(linear))
    return len(targets)
