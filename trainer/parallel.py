"""Scaling a Transformer with PyTorch's own engines: FSDP2 sharding (`fully_shard`), activation checkpointing and
torch.compile. Each function changes the model in place and keeps its state-dict keys, so checkpoints written
from a wrapped model are the plain model's.

Apply them in torchtitan's order: `use_hidden_states_output` (trainer.loss), `apply_activation_checkpointing`,
`maybe_compile`, then `apply_fsdp`; build the optimizer after `apply_fsdp` (it must hold the sharded parameters).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from model.inductor import pin_cpu_simd_width

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# torch.distributed.fsdp is imported in the functions that use it: importing it (with torch.distributed.tensor)
# costs ~1 s of a trainer's start-up, before any of them runs (by then torch.optim has loaded most of it anyway).

log = logging.getLogger(__name__)


def _blocks(model: nn.Module) -> nn.ModuleList:
    # A Transformer's `layers` is an nn.ModuleList; torch types a module attribute as `Tensor | Module`.
    return cast(nn.ModuleList, model.layers)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    mixed_precision_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard `model` (a Transformer) over `mesh` (default: every rank of the default process group) with FSDP2:
    each TransformerBlock is one unit (gathered just before it runs, freed after), the root holds the rest (the
    embedding, the final norm and the output projection).

    A tied embedding is one Parameter reached from `tok_embeddings` and `output`: both belong to the root unit,
    so it is sharded once and both uses see the same gathered tensor and add their gradients to it.
    `reshard_after_forward` applies to the blocks (False: more memory, no gather in backward).
    With `mixed_precision_dtype` (bfloat16) the gathered parameters and the computation use that dtype while
    the sharded master weights, the optimizer and the gradient reduction stay fp32. Returns `model`, which is
    now also an `FSDPModule`; its parameters are DTensors (build the optimizer afterwards).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = (
        MixedPrecisionPolicy(param_dtype=mixed_precision_dtype, reduce_dtype=torch.float32)
        if mixed_precision_dtype is not None
        else MixedPrecisionPolicy()
    )
    blocks = list(_blocks(model))
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again first thing in backward: keeping them saves a gather.
        reshard = reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    # The root stays gathered between forward and backward (FSDP2's own default for the root: backward needs it
    # at once); `trainer.loss.lm_loss` relies on it, reading the gathered output weight after the forward.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each TransformerBlock's activations in backward instead of storing them (non-reentrant
    torch.utils.checkpoint): activation memory drops to one block's inputs per layer, at the cost of a second
    forward of each block. The block's `forward` is replaced on the instance, so module names and the state
    dict are unchanged and FSDP's hooks (on the module call) run outside the recomputed region."""
    for block in _blocks(model):
        if isinstance(block.forward, functools.partial):
            continue  # already applied
        block.forward = functools.partial(_checkpointed, block.forward)
    return model


def maybe_compile(model: nn.Module, enabled: bool = True, whole_model: bool = False) -> nn.Module:
    """torch.compile each TransformerBlock (the default: one graph, compiled once and reused by every layer), or
    the whole model, in place (`nn.Module.compile`): no `torch._dynamo.OptimizedModule` wrapper, so the state dict
    has no `_orig_mod.` keys and checkpoints load into an uncompiled model. Returns `model`."""
    if not enabled:
        return model
    pin_cpu_simd_width()
    if whole_model:
        model.compile()
    else:
        for block in _blocks(model):
            block.compile()
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and `torch.compile(model)` wrappers (whose state dicts prefix `module.` and
    `_orig_mod.`); FSDP2, `maybe_compile` and `apply_activation_checkpointing` modify in place and need none."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> nn.Module:
    """Put every FSDP unit of `model` back into its sharded state (a no-op for other models). The root unit stays
    gathered after a forward (`apply_fsdp`), which a no-grad forward (evaluation) never follows with the backward
    that would free it: its parameters are then plain full tensors, not the DTensor shards that a checkpoint, the
    optimizer or a state-dict gather expect. Returns `model`."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model
