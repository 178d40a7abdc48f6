"""Cross-entropy of the output projection computed a chunk of tokens at a time, so the (tokens, vocab) logits
are never held in fp32 at once: 8 x 2048 tokens x 49152 vocab are 3.2 GB of fp32 logits (and as much again for
their gradient); a chunk of 1024 tokens holds 200 MB. Measured (forward and backward of the loss alone, fp32,
4096 tokens, vocab 49152, n_embd 576, extra peak RSS): full logits 2207 MiB, chunks of 2048 1169 MiB, chunks of
1024 600 MiB; the chunked figure does not grow with the number of tokens, the full one grows linearly.

The gradients of each chunk are computed in the forward pass, right after its loss, while its logits are at hand
(Liger's fused linear cross-entropy does the same): the backward pass then only scales two saved tensors, the
gradient of the hidden states (tokens, n_embd) and of the weight (vocab, n_embd), both far smaller than the
logits, and no matmul is recomputed.

Training uses it through `HiddenStatesOutput`: `model.output` is replaced by a module that keeps the same weight
(the state dict and the tied embedding are unchanged) and returns the final hidden states, so `model(x)` runs
through DDP, FSDP and torch.compile wrappers as usual and `lm_loss` finishes the projection chunk by chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar, cast

import torch
from torch import nn

IGNORE_INDEX = -100

M = TypeVar("M", bound=nn.Module)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over non-ignored tokens of -log softmax(hidden @ weight.T)[target], and the count of those tokens."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size, with_grad):
        # hidden (N, D), weight (V, D), targets (N,)
        valid = targets != ignore_index  # (N,)
        safe_targets = torch.where(valid, targets, 0)
        count = valid.sum()
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        # Accumulated over chunks in fp32 whatever the compute dtype, as an fp32 weight gradient would be.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h, t, v = hidden[start:end], safe_targets[start:end], valid[start:end]
            logits = (h @ weight.T).float()  # (c, V) fp32: the only chunk-sized buffer
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            target_logit = logits.gather(1, t.unsqueeze(1)).squeeze(1)
            loss_sum += ((lse - target_logit) * v).sum()
            if with_grad:
                # d(loss_sum)/d(logits) = softmax - one_hot(target), zero on ignored tokens; built in place.
                g = logits.sub_(lse.unsqueeze(1)).exp_()
                g.scatter_add_(1, t.unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
                g.mul_(v.unsqueeze(1))
                g = g.to(h.dtype)
                assert grad_hidden is not None and grad_weight is not None  # allocated when with_grad
                grad_hidden[start:end] = g @ weight
                if h.dtype == torch.float32:
                    grad_weight.addmm_(g.T, h)
                else:
                    grad_weight += (g.T @ h).float()
        ctx.mark_non_differentiable(count)
        if with_grad:
            assert grad_weight is not None
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss_sum, count

    @staticmethod
    def backward(ctx, grad_loss, grad_count):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            grad_weight * grad_loss.to(grad_weight.dtype),
            None,
            None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)` (fp32 logits, as the model returns
    them) without materialising more than `chunk_size` rows of logits at once.

    `hidden` is (..., n_embd), `targets` the matching (...) token ids, `weight` (vocab, n_embd). `reduction`
    "mean" averages over the non-ignored tokens (0, with zero gradients, when all are ignored, where
    F.cross_entropy gives NaN: an SFT micro-batch may hold no assistant token); "sum" returns their sum, for a
    caller that divides by a token count across micro-batches or ranks. Under autocast the matmuls run in the
    autocast dtype, as the model's output projection would.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the weight's {tuple(weight.shape)}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        loss_sum, count = _ChunkedLinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), ignore_index, chunk_size, with_grad
        )
    if reduction == "sum":
        return loss_sum
    return loss_sum / count.clamp(min=1)


class HiddenStatesOutput(nn.Module):
    """Stands in for a Transformer's `output` projection during training: returns its input, the normalised final
    hidden states, and keeps the projection's `weight` (the same Parameter, so a tied embedding stays tied and
    the state dict keeps `output.weight`)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def use_hidden_states_output(model: nn.Module) -> None:
    """Make `model(x)` return final hidden states (B, T, n_embd) instead of logits, for `lm_loss`. Call it before
    `apply_fsdp`/`maybe_compile` (they capture the module tree)."""
    if not isinstance(model.output, HiddenStatesOutput):
        # A Transformer's `output` is an nn.Linear; torch types a module attribute as `Tensor | Module`.
        model.output = HiddenStatesOutput(cast(nn.Parameter, cast(nn.Linear, model.output).weight))


@contextlib.contextmanager
def logits_output(model: M) -> Iterator[M]:
    """Temporarily give back a `use_hidden_states_output` model its logits (for sampling or a logits check);
    the linear layer shares the same weight. Not for FSDP-sharded models."""
    head = model.output
    if not isinstance(head, HiddenStatesOutput):
        yield model
        return
    linear = nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=False, device="meta")
    linear.weight = head.weight
    model.output = linear
    try:
        yield model
    finally:
        model.output = head


def lm_loss(
    model: nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    chunk_size: int = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token loss of `model` (a Transformer after `use_hidden_states_output`, or its DDP/FSDP/compiled
    wrapper) on `idx` (B, T) against `targets` (B, T, IGNORE_INDEX where no loss is wanted), chunked.

    `weight` is the output projection (default: the model's `output.weight`, under DDP `module.output.weight`,
    read after the forward, when FSDP has gathered it).
    """
    hidden = model(idx) if positions is None else model(idx, positions)  # (B, T, n_embd)
    if weight is None:
        inner: Any = getattr(model, "module", model)  # a Transformer (DDP's `module`): its `output` has a weight
        weight = inner.output.weight
    return chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, reduction=reduction)
