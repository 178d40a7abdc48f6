"""Where the model and tokenizer come from (`init_from: scratch | bundled | PATH`), checked before any work."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model import bundled
from model.checkpoint import CheckpointError, from_hf_state_dict, is_complete_checkpoint, read_config, read_hf_tensors
from model.config import ModelConfig
from model.llama import Transformer
from trainer.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class ModelSource:
    config: ModelConfig
    init_path: Path | None  # None: fresh weights from `init_weights(seed)`
    tokenizer_path: Path


# How long the other ranks of a job wait for rank 0 to convert the embedded model (about a minute on a CPU).
BUNDLED_WAIT_S = 900.0


def _bundled() -> Path:
    """The embedded model's checkpoint. Under torchrun only rank 0 converts it on a fresh cache: every rank
    converting into the one directory would replace it under the others' feet. The others wait for the
    directory to appear (it appears complete: the conversion renames it into place)."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
            return _wait_for(bundled.default_checkpoint_dir(), BUNDLED_WAIT_S)
        return bundled.default_checkpoint()
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError(f"the embedded model is unavailable: {e}") from None


def _wait_for(path: Path, timeout_s: float) -> Path:
    bundled.bundled_gguf_path()  # not installed: fail now, not after the timeout
    deadline = time.monotonic() + timeout_s
    while not is_complete_checkpoint(path):
        if time.monotonic() > deadline:
            raise ConfigError(f"the embedded model: rank 0 did not convert it into {path} within {timeout_s:.0f}s")
        time.sleep(0.5)
    return path


def resolve_model_source(cfg: TrainConfig) -> ModelSource:
    """The model config, initial weights and tokenizer the job will use; errors name the config key."""
    if cfg.init_from == "scratch":
        try:
            config = ModelConfig.from_name(cfg.model)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        init_path = None
        tok = _bundled() if cfg.tokenizer == "bundled" else Path(cfg.tokenizer)
        if not ((tok / "tokenizer.json").is_file() or (tok / "tokenizer_config.json").is_file()):
            raise ConfigError(f"tokenizer: {tok}: no tokenizer files (tokenizer.json) there")
    else:
        init_path = _bundled() if cfg.init_from == "bundled" else Path(cfg.init_from)
        if not init_path.is_dir():
            raise ConfigError(f"init_from: {init_path}: no such checkpoint directory")
        try:
            config = read_config(init_path)
        except CheckpointError as e:
            raise ConfigError(f"init_from: {e}") from None
        tok = init_path
        if not (tok / "tokenizer.json").is_file():
            raise ConfigError(f"init_from: {tok / 'tokenizer.json'}: missing (the checkpoint has no tokenizer)")
    overrides = cfg.model_overrides.changes()
    if "init_std" in overrides and init_path is not None:
        raise ConfigError(
            f"model_overrides.init_std: only applies to init_from: scratch (the weights come from {init_path})"
        )
    try:
        config = config.replace(**overrides)
    except ValueError as e:
        raise ConfigError(f"model_overrides: {e}") from None
    if cfg.data.seq_len > config.block_size:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's block size {config.block_size}")
    if cfg.sample_every and cfg.sample_tokens >= config.block_size:
        raise ConfigError(f"sample_tokens={cfg.sample_tokens} leaves no room for a prompt in {config.block_size}")
    return ModelSource(config=config, init_path=init_path, tokenizer_path=tok)


def build_model(source: ModelSource, seed: int) -> Transformer:
    """fp32 master weights on the CPU: fresh from `seed`, or the init checkpoint's."""
    if source.init_path is None:
        model = Transformer(source.config)
        model.init_weights(seed)
        return model
    try:
        # `source.config`, not the checkpoint's own: `model_overrides` (RoPE theta, block size) apply.
        tensors = read_hf_tensors(source.init_path)
        return from_hf_state_dict(source.config, tensors, torch.float32, source=str(source.init_path)).eval()
    except CheckpointError as e:
        raise ConfigError(f"init_from: {e}") from None
