"""What a training run carries from step to step and what a checkpoint restores: `restore_or_init` returns it,
fresh or resumed from the newest checkpoint that loads."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import run_dir
from model.llama import Transformer
from trainer import checkpointing, distributed
from trainer.chat_data import ChatBatches, PackedRows
from trainer.config import TrainConfig
from trainer.data import WindowSampler
from trainer.distributed import DistInfo
from trainer.init_source import ModelSource, build_model
from trainer.mixture import Mixture, MixtureSampler
from trainer.optim import apply_hyperparameters, build_optimizer

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """The newest validation loss and the step it was measured at."""

    step: int
    loss: float


@dataclass
class TrainState:
    """The model (fp32 master weights, not wrapped by DDP; sharded in place under FSDP), its optimizer, the data
    position and the step count."""

    step: int
    model: Transformer
    optimizer: torch.optim.Optimizer
    sampler: WindowSampler | ChatBatches | MixtureSampler
    resumed_from: Path | None = None
    last_eval: Evaluation | None = None
    saved: dict[str, Any] = field(default_factory=dict)  # the loaded trainer state (empty on a fresh start)

    def to_checkpoint(
        self, lr: float, cfg: TrainConfig, info: DistInfo, evaluation: Evaluation | None = None
    ) -> dict[str, Any]:
        """The trainer state written next to the weights (`model.run_dir.STATE_FILE`). `val_loss` is the
        validation loss of these weights (None without a validation split), for a server's promotion gate."""
        return {
            **self._common_state(lr, cfg, info, evaluation),
            "optimizer": self.optimizer.state_dict(),
            "data": self.sampler.state_dict(),
            "rng": checkpointing.capture_rng_state(),
        }

    def to_sharded_checkpoint(
        self, lr: float, cfg: TrainConfig, info: DistInfo, evaluation: Evaluation | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """`to_checkpoint` split for `parallel: fsdp` (`trainer.sharded_checkpoint.save_sharded`): the trainer state
        common to all ranks, without the optimizer (DCP writes its shards), and this rank's own state, its data
        position and RNG."""
        return self._common_state(lr, cfg, info, evaluation), {
            "data": self.sampler.state_dict(),
            "rng": checkpointing.capture_rng_state(),
        }

    def _common_state(
        self, lr: float, cfg: TrainConfig, info: DistInfo, evaluation: Evaluation | None
    ) -> dict[str, Any]:
        return {
            "step": self.step,
            # The schedule is a pure function of the step (trainer.optim.lr_at); this records where it stood.
            "scheduler": {"step": self.step, "lr": lr},
            "config": cfg.model_dump(mode="json"),
            "world_size": info.world_size,
            "val_loss": None if evaluation is None else evaluation.loss,
            "val_loss_step": None if evaluation is None else evaluation.step,
            # A weighted mixture's sources (trainer.mixture), common to all ranks: the sharded layout keeps the
            # sampler's state per rank, and the summary next to the weights reads it from here.
            "mixture": self.sampler.state_dict().get("mixture"),
        }


def restore_or_init(
    cfg: TrainConfig,
    source: ModelSource,
    train_tokens: np.ndarray | PackedRows | Mixture,
    out_dir: Path,
    info: DistInfo,
    parallelize: Callable[[Transformer], Transformer] | None = None,
) -> TrainState:
    """Resume from the newest checkpoint in `out_dir` that loads completely, else start fresh from `source`.

    `parallelize(model)` changes the model in place (training-only changes, FSDP sharding) after it is on its
    device and before the optimizer is built over its (then possibly sharded) parameters.
    Seeds first, so a fresh start is reproducible; on a resume the saved RNG states replace the seeded ones
    last, so the next step draws exactly what the uninterrupted run drew.
    """
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    sharded = cfg.parallel == "fsdp"
    resumed = resume_point(out_dir, info, sharded=sharded)
    if resumed is not None:
        resumed_from, model, saved = resumed
    else:
        resumed_from, saved = None, {}
        model = build_model(source, cfg.seed)
    model.to(info.device).train()
    if parallelize is not None:
        model = parallelize(model)
    optimizer = build_optimizer(model, cfg.optim, info.device)
    sampler = make_sampler(train_tokens, cfg, info)
    if resumed_from is not None and sharded:
        # Every rank reads its own shards of the weights and optimizer state, and its data position and RNG.
        saved = checkpointing.load_sharded_state(resumed_from, model, optimizer, info)
    step = int(saved.get("step", 0))
    if resumed_from is not None:
        log.info("resuming from %s (step %d)", resumed_from, step)
        _warn_config_changes(saved.get("config", {}), cfg.model_dump(mode="json"))
        if info.is_main and run_dir.read_latest(out_dir) != resumed_from.name:
            # `latest` named a checkpoint that does not load: point readers (the server) at a good one.
            run_dir.write_latest(out_dir, resumed_from.name)
    if saved:
        if not sharded:
            optimizer.load_state_dict(saved["optimizer"])
        apply_hyperparameters(optimizer, cfg.optim)  # the loaded state carries the saved run's values
        sampler.load_state_dict(saved["data"])
        checkpointing.restore_rng_state(saved["rng"])
    distributed.barrier(info)  # rank 0 may have rewritten `latest`
    return TrainState(step, model, optimizer, sampler, resumed_from, saved=saved)


def make_sampler(
    train_data: np.ndarray | PackedRows | Mixture, cfg: TrainConfig, info: DistInfo
) -> WindowSampler | ChatBatches | MixtureSampler:
    """Random windows of a token stream (text) or of weighted sources (a mixture), or packed conversation rows
    in a seeded order (chat)."""
    if isinstance(train_data, PackedRows):
        return ChatBatches(train_data, cfg.batch_size, cfg.seed, info.rank, info.world_size)
    if isinstance(train_data, Mixture):
        return train_data.sampler(cfg.data.seq_len, cfg.batch_size, cfg.seed, info.rank, info.world_size)
    return WindowSampler(train_data, cfg.data.seq_len, cfg.batch_size, cfg.seed, info.rank, info.world_size)


def resume_point(
    out_dir: Path,
    info: DistInfo,
    broadcast: Callable[[Any, DistInfo], Any] = distributed.broadcast_object,
    sharded: bool = False,
) -> tuple[Path, Transformer, dict[str, Any]] | None:
    """The checkpoint to resume from, the same on every rank: rank 0 picks the newest that loads and tells the
    others, which load exactly that one (a rank that cannot read it fails instead of silently starting from
    another step, which would hang the job at its first collective). `broadcast` is a seam for tests.
    `sharded` (`parallel: fsdp`): checkpoints with `sharded/` training state, whose state is read later
    (`checkpointing.load_sharded_state`), so the returned state is empty."""
    found = checkpointing.find_resumable(out_dir, sharded) if info.is_main else None
    name = broadcast(None if found is None else found[0].name, info)
    if found is None and name is not None:
        model, saved = checkpointing.load_resumable(out_dir / name, sharded)
        found = (out_dir / name, model, saved)
    return found


def _warn_config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> None:
    """A resume continues the saved run; changed settings apply from here on, which is worth a warning."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            log.warning("resuming with %s%s=%r (the checkpoint was trained with %r)", prefix, key, b, a)
