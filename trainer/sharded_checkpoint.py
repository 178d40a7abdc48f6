"""Sharded training checkpoints through `torch.distributed.checkpoint` (DCP): every rank writes its own shards of
the model and optimizer state (no gather onto one process), and a plain Hugging Face directory can be exported
from a live sharded model or from a checkpoint on disk, for the server and `transformers`.

A checkpoint directory holds DCP's files (`.metadata`, `__*_*.distcp`), `config.json` (the model's Hugging Face
config, so an export needs no live model), `trainer_state.pt` (rank 0's: step, config, ...) and
`rank-NNNNN.pt` per rank (what differs by rank: RNG, data position). It is written like the other checkpoints:
into a hidden sibling that rank 0 renames into place once every rank has finished, so a reader (or a crash)
sees a complete directory or none.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from model.checkpoint import CONFIG_FILE, CheckpointError, atomic_directory, read_config, save_checkpoint
from model.llama import Transformer
from trainer.parallel import reshard

# torch.distributed.checkpoint is imported in the functions that use it: importing it costs every trainer process
# ~0.3 s of start-up (more where nothing else loaded torch.distributed.tensor), and only checkpoints of
# `parallel: fsdp` use it.

log = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.pt"
DCP_METADATA_FILE = ".metadata"


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        dist.barrier()


def _config_of(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no `config`: pass the Transformer (FSDP wraps it in place)")
    return config


def save_sharded(
    target: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any] | None = None,
) -> Path:
    """Collective (every rank calls it): write the model and optimizer shards of each rank, `trainer_state`
    (rank 0's) and each rank's `rank_state` to the directory `target`, atomically. Returns `target`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = _dist()
    model_sd, optim_sd = get_state_dict(reshard(model), optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    config = _config_of(model)

    def write_shards(tmp: Path) -> None:
        dcp.save(state, checkpoint_id=tmp)
        if rank_state is not None:
            torch.save(rank_state, tmp / _rank_file(rank))

    if rank == 0:

        def write(tmp: Path) -> None:
            if world > 1:
                dist.broadcast_object_list([str(tmp)], src=0)
            write_shards(tmp)
            torch.save({**trainer_state, "world_size": world}, tmp / TRAINER_STATE_FILE)
            (tmp / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
            _barrier()  # every rank's files are in `tmp` before it is renamed

        path = atomic_directory(target, write)
    else:
        holder: list[Any] = [None]
        dist.broadcast_object_list(holder, src=0)
        write_shards(Path(holder[0]))
        _barrier()
        path = Path(target).absolute()
    _barrier()  # nobody returns before the rename: a later load on any rank finds the directory
    return path


def is_complete_sharded(path: str | os.PathLike[str]) -> bool:
    path = Path(path)
    return all((path / name).is_file() for name in (DCP_METADATA_FILE, TRAINER_STATE_FILE, CONFIG_FILE))


def load_sharded(
    path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Collective: load a `save_sharded` checkpoint into `model` (and `optimizer`), resharding to the current
    world size and sharding if they differ from the writer's. Returns (trainer_state, this rank's rank_state,
    None if the writer had fewer ranks or wrote none). Raises CheckpointError for an incomplete directory."""
    path = Path(path)
    if not is_complete_sharded(path):
        raise CheckpointError(
            f"{path}: not a complete sharded checkpoint ({DCP_METADATA_FILE}, "
            f"{TRAINER_STATE_FILE} and {CONFIG_FILE} are required)"
        )
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

    rank, _ = _dist()
    reshard(model)
    state: dict[str, Any]
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optim", {}),
    )
    # Our own files: they hold numpy and python RNG states besides tensors, hence weights_only=False.
    trainer_state = torch.load(path / TRAINER_STATE_FILE, map_location="cpu", weights_only=False)
    return trainer_state, read_rank_state(path, rank)


def read_rank_state(path: str | os.PathLike[str], rank: int) -> dict[str, Any] | None:
    """The `rank_state` rank `rank` wrote into the `save_sharded` checkpoint at `path`, None if it wrote none
    (a checkpoint of fewer ranks): a resume on more ranks than the writer had reads rank 0's instead."""
    rank_path = Path(path) / _rank_file(rank)
    return torch.load(rank_path, map_location="cpu", weights_only=False) if rank_path.is_file() else None


def gather_full_model(model: nn.Module) -> Transformer | None:
    """Collective: the full (unsharded) weights of a live, possibly FSDP-sharded `model`, gathered onto rank 0 in
    CPU memory, as a plain Transformer (its parameters' dtype, no wrappers). Returns None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank, _ = _dist()
    config = _config_of(model)
    # cpu_offload: rank 0 alone receives the tensors, one at a time onto the CPU; the others get an empty dict.
    full = get_model_state_dict(reshard(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A full state dict holds plain tensors (no DTensor or ShardedTensor).
    return _plain_model(config, cast(dict[str, torch.Tensor], full)) if rank == 0 else None


def export_hf(
    model: nn.Module, target: str | os.PathLike[str], tokenizer: Any | None = None, dtype: torch.dtype | None = None
) -> Path | None:
    """Collective: gather the full (unsharded) weights of a live, possibly FSDP-sharded `model` onto rank 0 (in
    CPU memory) and write them there as a Hugging Face directory (`model.checkpoint.save_checkpoint`, atomic).
    Returns the path on rank 0, None on the others."""
    plain = gather_full_model(model)
    path = None
    if plain is not None:
        path = save_checkpoint(target, plain, tokenizer=tokenizer, dtype=dtype)
    _barrier()
    return path


def export_hf_from_sharded(
    path: str | os.PathLike[str],
    target: str | os.PathLike[str],
    tokenizer: Any | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """One process, no process group: read the model weights (not the optimizer) of a `save_sharded` checkpoint,
    written by any number of ranks, and write them as a Hugging Face directory at `target`."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not is_complete_sharded(path):
        raise CheckpointError(f"{path}: not a complete sharded checkpoint")
    config = read_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    state = {"model": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}}
    # Without a process group DCP reads every shard into these full tensors in this process.
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return save_checkpoint(target, _plain_model(config, state["model"]), tokenizer=tokenizer, dtype=dtype)


def _plain_model(config: Any, state_dict: dict[str, torch.Tensor]) -> Transformer:
    """A plain fp32-or-stored-dtype Transformer on the CPU holding `state_dict` (our parameter names)."""
    model = Transformer(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model
