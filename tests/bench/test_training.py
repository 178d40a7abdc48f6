from __future__ import annotations

import pytest

from bench.training import TrainCase, run_training, train_config


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_training_step_of_both_models(dtype):
    from model.config import ModelConfig
    from trainer.mfu import flops_per_token

    out = run_training(peak_flops={dtype: 1e11}, cases=[TrainCase("tiny", 2, 32, dtype=dtype, steps=2, warmup=1)])
    run = out["runs"][f"tiny {dtype}"]
    assert (run["batch_size"], run["seq_len"], run["dtype"]) == (2, 32, dtype)
    assert run["params"] == ModelConfig.from_name("tiny").num_params()
    for impl in ("ours", "transformers"):
        r = run[impl]
        assert r["tokens_per_s"] > 0
        assert r["mfu_pct"] == pytest.approx(
            100 * flops_per_token(ModelConfig.from_name("tiny"), 32) * r["tokens_per_s"] / 1e11
        )


def test_peak_is_measured_when_not_given():
    out = run_training(quick=True, cases=[TrainCase("tiny", 1, 16, dtype="float32", steps=1, warmup=0)])
    assert out["runs"]["tiny float32"]["peak_gflops"] > 0


def test_bad_case_is_refused_by_the_trainers_validation():
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="seq_len"):
        train_config(TrainCase("tiny", 1, 0))
    with pytest.raises(ConfigError, match="block size"):
        run_training(peak_flops={"bfloat16": 1e11}, cases=[TrainCase("tiny", 1, 1024, steps=1, warmup=0)])
