"""Crash-safe checkpoints in the output directory, retention, and resuming from the newest good one.

The layout (`OUT/step-000123/`, `OUT/latest`) is `model.run_dir`'s. Each checkpoint is a Hugging Face model
directory written by `model.checkpoint.save_checkpoint` (atomically: a hidden sibling renamed into place) with
the trainer state added inside before the rename; `latest` is replaced atomically only after that rename. A
`kill -9` at any instant therefore leaves complete checkpoints and hidden debris only.

With `parallel: ddp` (and one process) rank 0 writes the whole training state into `trainer_state.pt`. With
`parallel: fsdp` no process holds the whole optimizer state: the weights are gathered onto rank 0 for the Hugging
Face files only, and every rank writes its shards of the model and optimizer, its RNG and data position under
`step-*/sharded/` (`trainer.sharded_checkpoint`, DCP), inside the same hidden directory before the same rename.
Readers of the Hugging Face files (the server) see the same directory either way.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import yaml

from model.checkpoint import CheckpointError, is_complete_checkpoint, load_model, save_checkpoint
from model.llama import Transformer
from model.run_dir import (
    LATEST_FILE,
    STATE_FILE,
    checkpoint_dirs,
    is_latest_temp,
    read_latest,
    step_dir_name,
    write_latest,
    write_summary,
)
from trainer import distributed
from trainer.nonfinite import DivergedError, first_nonfinite_parameter
from trainer.parallel import is_fsdp, reshard
from trainer.sharded_checkpoint import (
    gather_full_model,
    is_complete_sharded,
    load_sharded,
    read_rank_state,
    save_sharded,
)

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from trainer.config import TrainConfig
    from trainer.distributed import DistInfo
    from trainer.state import Evaluation, TrainState

log = logging.getLogger(__name__)

CONFIG_FILE = "trainer_config.yaml"
SHARDED_DIR = "sharded"  # `parallel: fsdp`: the DCP training state inside a checkpoint directory
# Test hook, "SECONDS" or "STEP:SECONDS": sleep inside the checkpoint write (of that step only), after the
# trainer state is written and before the rename, so a test can `kill -9` the job mid-write deterministically.
PAUSE_ENV = "SMOLLM_TRAINER_PAUSE_IN_CHECKPOINT_WRITE"


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # A run resumed on a node with fewer (or more) GPUs than the one that saved: restore the devices both
        # have; set_rng_state_all would index past the end.
        saved, present = state["cuda"], torch.cuda.device_count()
        if len(saved) != present:
            log.warning(
                "the checkpoint holds CUDA RNG states of %d devices, this node has %d: restoring %d",
                len(saved),
                present,
                min(len(saved), present),
            )
        for device, rng in enumerate(saved[:present]):
            torch.cuda.set_rng_state(rng, device)


def _dcp_error() -> type[BaseException]:
    """DCP's failure (a BaseException), imported only when an exception is being matched against it: importing
    torch.distributed.checkpoint costs every trainer process ~0.3 s of start-up, and only `parallel: fsdp` uses it."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, I/O error); nothing partial is visible."""


def save(
    out_dir: Path,
    step: int,
    model: Transformer,
    tokenizer: Any,
    state: dict[str, Any],
    keep_last: int,
    shards: Callable[[Path], None] | None = None,
) -> Path:
    """Write `OUT/step-NNNNNN` (model, tokenizer, trainer state), update `latest`, apply retention.
    `shards(tmp)` writes the training state instead of `trainer_state.pt` (`parallel: fsdp`: every rank's shards
    under `tmp/sharded`); `state` still gives the summary and the config written next to the weights."""

    def add_trainer_state(tmp: Path) -> None:
        if shards is None:
            torch.save(state, tmp / STATE_FILE)
        else:
            shards(tmp)
        summary = {key: state.get(key) for key in ("step", "val_loss", "val_loss_step")}
        if state.get("mixture") is not None:
            summary["mixture"] = state["mixture"]  # a weighted mixture's sources (trainer.mixture)
        write_summary(tmp, summary)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(state["config"], sort_keys=False))
        pause = _pause_seconds(os.environ.get(PAUSE_ENV, ""), step)
        if pause > 0:
            log.warning("%s set: pausing %.1fs inside the checkpoint write of step %d", PAUSE_ENV, pause, step)
            time.sleep(pause)

    t0 = time.perf_counter()
    # The model's own dtype (fp32 master weights): a resume must continue from exactly these values.
    target = out_dir / step_dir_name(step)
    try:
        path = save_checkpoint(target, model, tokenizer=tokenizer, extra=add_trainer_state)
    # torch.save reports a full disk as a RuntimeError, DCP a failure on any rank as a CheckpointException.
    except (OSError, RuntimeError, _dcp_error()) as e:
        raise CheckpointWriteError(_write_failure(out_dir, target, e)) from e
    previous = read_latest(out_dir)
    try:
        write_latest(out_dir, path.name)
    except OSError as e:
        raise CheckpointWriteError(
            f"wrote checkpoint {path} but could not update {out_dir / LATEST_FILE}: {e}; "
            f"it still names {previous or 'nothing'}"
        ) from e
    log.info("saved checkpoint %s in %.1fs", path, time.perf_counter() - t0)
    try:
        apply_retention(out_dir, keep_last)
    except OSError as e:
        raise CheckpointWriteError(
            f"wrote checkpoint {path} (latest names it) but could not delete older ones (keep_last={keep_last}): {e}"
        ) from e
    return path


def _write_failure(out_dir: Path, target: Path, error: BaseException) -> str:
    free = shutil.disk_usage(out_dir).free
    disk = f"the disk is full ({free >> 20} MiB free)" if free < 256 << 20 else f"{free >> 20} MiB free"
    latest = read_latest(out_dir)
    kept = f"the previous checkpoint {latest} is intact" if latest else "no earlier checkpoint exists"
    return f"could not write checkpoint {target}: {error}; {disk} on {out_dir}; {kept}; nothing partial was left"


def _pause_seconds(spec: str, step: int) -> float:
    if not spec:
        return 0.0
    at, _, seconds = spec.rpartition(":")
    return float(seconds) if not at or int(at) == step else 0.0


def apply_retention(out_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names); returns the deleted."""
    latest = read_latest(out_dir)
    deleted = []
    for _, path in checkpoint_dirs(out_dir)[keep_last:]:
        if path.name == latest:
            continue
        # Hide it first (an atomic rename), so a kill during the deletion leaves no half-deleted `step-*`.
        hidden = out_dir / f".{path.name}.del-{os.getpid()}"
        os.rename(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
        deleted.append(path)
    return deleted


def remove_debris(out_dir: Path) -> None:
    """Remove hidden leftovers of writes or deletions interrupted by a crash (one trainer per OUT)."""
    if not out_dir.is_dir():
        return
    for p in out_dir.iterdir():
        if p.name.startswith(".step-") or is_latest_temp(p.name):
            log.info("removing leftover %s of an interrupted run", p)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


class ParallelMismatchError(CheckpointError):
    """The newest checkpoint was written with the other `parallel` mode: resuming it would lose its training
    state, and skipping it would start the run over."""


def _check_layout(path: Path, sharded: bool) -> None:
    if not is_complete_checkpoint(path):
        return
    written_sharded = (path / SHARDED_DIR).is_dir() and not (path / STATE_FILE).is_file()
    if (path / STATE_FILE).is_file() and sharded:
        written, wanted = "ddp", "fsdp"
    elif written_sharded and not sharded:
        written, wanted = "fsdp", "ddp"
    else:
        return
    raise ParallelMismatchError(
        f"{path} was written with parallel: {written}, this run has parallel: {wanted}; resume it with "
        f"parallel: {written}, or start a new run in another --out (init_from: {path} continues from its weights)"
    )


def load_resumable(path: Path, sharded: bool = False) -> tuple[Transformer, dict[str, Any]]:
    """A checkpoint's fp32 weights and trainer state; CheckpointError names what is wrong. With `sharded`
    (`parallel: fsdp`) the trainer state is in `path/sharded` and read later by `load_sharded_state`, once the
    model is sharded and its optimizer built: the returned state is empty."""
    _check_layout(path, sharded)
    if sharded:
        if not is_complete_checkpoint(path) or not is_complete_sharded(path / SHARDED_DIR):
            raise CheckpointError(f"{path}: incomplete checkpoint")
        try:
            return load_model(path, dtype=torch.float32), {}
        except CheckpointError:
            raise
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot load it: {e}") from e
    if not is_complete_checkpoint(path) or not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint")
    try:
        # Our own file: it holds numpy and python RNG states besides tensors, hence weights_only=False.
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        return load_model(path, dtype=torch.float32), state
    except CheckpointError:
        raise
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load it: {e}") from e


def find_resumable(out_dir: Path, sharded: bool = False) -> tuple[Path, Transformer, dict[str, Any]] | None:
    """The newest checkpoint that loads completely (weights and trainer state), falling back to older ones.
    Raises ParallelMismatchError at a complete checkpoint of the other `parallel` mode."""
    for _, path in checkpoint_dirs(out_dir):
        try:
            model, state = load_resumable(path, sharded)
        except ParallelMismatchError:
            raise
        except CheckpointError as e:
            log.warning("skipping %s", e)
            continue
        return path, model, state
    return None


def load_sharded_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo
) -> dict[str, Any]:
    """Collective: load the sharded training state of the checkpoint `path` (`parallel: fsdp`) into `model` (sharded
    or not) and `optimizer`, resharding from the writer's world size, and return the trainer state with this rank's
    data position and RNG (rank 0's when the writer had fewer ranks)."""
    shards = path / SHARDED_DIR
    try:
        trainer_state, rank_state = load_sharded(shards, model, optimizer)
        if rank_state is None:
            rank_state = read_rank_state(shards, 0)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, _dcp_error()) as e:
        raise CheckpointError(f"{shards}: cannot load it: {e}") from e
    if rank_state is None:
        raise CheckpointError(f"{shards}: no rank state (data position, RNG) in it")
    if trainer_state.get("world_size") != info.world_size:
        log.warning(
            "%s was written by %s processes, this run has %d: the shards are redistributed; the data order "
            "continues from rank 0's position",
            path,
            trainer_state.get("world_size"),
            info.world_size,
        )
    return {**trainer_state, **rank_state}


def _nonfinite_parameter(model: torch.nn.Module, info: DistInfo) -> str | None:
    """`first_nonfinite_parameter`, also for FSDP, where each rank holds a shard: every rank checks its own and they
    agree on the first bad name, so every rank raises together."""
    if not is_fsdp(model):
        return first_nonfinite_parameter(model)
    # Under FSDP every parameter is a DTensor (torch types named_parameters as plain Parameters).
    mine = next(
        (
            name
            for name, p in reshard(model).named_parameters()
            if not cast("DTensor", p.detach()).to_local().isfinite().all()
        ),
        None,
    )  # host sync per shard: only at checkpoint time
    return next((name for name in distributed.all_gather_object(mine, info) if name is not None), None)


class Checkpointer:
    """When to checkpoint and the collective around it: rank 0 writes, every rank waits for it (`parallel: ddp`),
    or every rank writes its shards and rank 0 the Hugging Face files (`parallel: fsdp`)."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, tokenizer: Any, info: DistInfo) -> None:
        self.out_dir, self.cfg, self.tokenizer, self.info = out_dir, cfg, tokenizer, info

    def due(self, step: int, stopping: bool) -> bool:
        return step % self.cfg.checkpoint_every == 0 or step == self.cfg.max_steps or stopping

    def save(self, state: TrainState, lr: float, evaluation: Evaluation | None) -> None:
        """Write the checkpoint of `state` recording `evaluation` (the current validation loss); weights that
        are not finite are never written (every rank holds the same weights, so every rank raises)."""
        bad = _nonfinite_parameter(state.model, self.info)
        if bad is not None:
            latest = read_latest(self.out_dir)
            raise DivergedError(
                f"step {state.step}: parameter {bad} is not finite; no checkpoint written, "
                f"latest still names {latest or 'nothing'}"
            )
        if self.cfg.parallel == "fsdp":
            self._save_sharded(state, lr, evaluation)
        elif self.info.is_main:
            trainer_state = state.to_checkpoint(lr, self.cfg, self.info, evaluation)
            save(self.out_dir, state.step, state.model, self.tokenizer, trainer_state, self.cfg.keep_last)
        distributed.barrier(self.info)

    def _save_sharded(self, state: TrainState, lr: float, evaluation: Evaluation | None) -> None:
        trainer_state, rank_state = state.to_sharded_checkpoint(lr, self.cfg, self.info, evaluation)
        # The Hugging Face files hold the full weights: gathered onto rank 0 (collective; the model itself when
        # nothing is sharded).
        plain = gather_full_model(state.model) if is_fsdp(state.model) else state.model

        def write_shards(tmp: Path | None) -> None:
            # Rank 0 names the hidden directory it is filling; every rank writes its shards into it.
            tmp = Path(distributed.broadcast_object(None if tmp is None else str(tmp), self.info))
            save_sharded(tmp / SHARDED_DIR, state.model, state.optimizer, trainer_state, rank_state)

        if self.info.is_main:
            assert plain is not None  # rank 0 receives the gathered weights
            save(self.out_dir, state.step, plain, self.tokenizer, trainer_state, self.cfg.keep_last, write_shards)
        else:
            try:
                write_shards(None)
            except _dcp_error() as e:  # DCP raised it on every rank; rank 0 reports the failure
                raise CheckpointWriteError(f"rank {self.info.rank}: could not write its checkpoint shards: {e}") from e
