"""AdamW with weight decay on matrices only, and the learning-rate schedule (warmup, then cosine or
warmup-stable-decay). The schedule is a pure function of the step, so resuming needs only the step."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from trainer.config import OptimConfig

log = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters: 2-D tensors (matmul weights, embeddings) decay, norms do not."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied embedding is listed once
    groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2]}]
    _set_hyperparameters(groups, cfg)
    # The fused kernel (CUDA, and CPU since torch 2.4) does the whole update in one pass per tensor.
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type in ("cuda", "cpu"))
    except (RuntimeError, TypeError) as e:
        log.info("fused AdamW unavailable (%s); using the foreach implementation", e)
        return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Set `cfg`'s betas, eps and weight decay on an optimizer built by `build_optimizer`. Loading a saved
    optimizer state restores the saved run's values, so a resume calls this afterwards: the config (and the
    log line that reports it) is what applies from here on."""
    _set_hyperparameters(optimizer.param_groups, cfg)


def _set_hyperparameters(groups: list[dict], cfg: OptimConfig) -> None:
    decay, no_decay = groups  # matrices, then norms (never decayed)
    for group in groups:
        group["betas"], group["eps"] = tuple(cfg.betas), cfg.eps
    decay["weight_decay"], no_decay["weight_decay"] = cfg.weight_decay, 0.0


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly to min_lr over the last `decay_fraction` of the run.
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    decay_start = max(cfg.warmup_steps, max_steps - decay_steps)
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start + 1) / max(1, max_steps - decay_start))
    return cfg.lr + (cfg.min_lr - cfg.lr) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
