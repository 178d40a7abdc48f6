import math

import pytest
import torch

from model.config import ModelConfig
from model.llama import Transformer
from trainer.config import OptimConfig
from trainer.optim import build_optimizer, lr_at


def test_weight_decay_on_matrices_only():
    model = Transformer(ModelConfig.from_name("tiny"))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # The tied embedding is one parameter, counted once.
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.config.num_params()


def test_cosine_schedule():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_warmup_stable_decay_schedule():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(4, cfg, 100) == pytest.approx(0.5)
    assert all(lr_at(s, cfg, 100) == 1.0 for s in range(10, 80))
    assert lr_at(89, cfg, 100) == pytest.approx(0.5)
    assert lr_at(99, cfg, 100) == pytest.approx(0.0)
    assert not math.isnan(lr_at(150, cfg, 100))
