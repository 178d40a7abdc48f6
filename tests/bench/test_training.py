from __future__ import annotations

import pytest

from bench import report
from bench.training import VARIANTS, TrainCase, run_training, train_config


def _assert_mfu_of_both_models(run: dict, dtype: str, peak_flops: float) -> None:
    from model.config import ModelConfig
    from trainer.mfu import flops_per_token

    assert (run["batch_size"], run["seq_len"], run["dtype"]) == (2, 32, dtype)
    assert run["params"] == ModelConfig.from_name("tiny").num_params()
    for impl in ("ours", "transformers"):
        r = run[impl]
        assert r["tokens_per_s"] > 0
        assert r["mfu_pct"] == pytest.approx(
            100 * flops_per_token(ModelConfig.from_name("tiny"), 32) * r["tokens_per_s"] / peak_flops
        )


# Each row is a subprocess that imports torch and transformers (seconds on the 2-core CI machine), so the float32
# rows of both models, the measured peak and every trainer option come from one run (the test below).
def test_tiny_bf16_training_step_of_both_models():
    out = run_training(peak_flops={"bfloat16": 1e11}, cases=[TrainCase("tiny", 2, 32, dtype="bfloat16", steps=2)])
    _assert_mfu_of_both_models(out["runs"]["tiny bfloat16"], "bfloat16", 1e11)


def test_bad_case_is_refused_by_the_trainers_validation():
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="seq_len"):
        train_config(TrainCase("tiny", 1, 0))
    with pytest.raises(ConfigError, match="block size"):
        run_training(peak_flops={"bfloat16": 1e11}, cases=[TrainCase("tiny", 1, 1024, steps=1, warmup=0)])


@pytest.mark.long
def test_each_trainer_option_gets_a_row_with_speed_and_memory_next_to_transformers():
    """Also: both models' float32 rows, their MFU against the peak measured here (none was given)."""
    case = TrainCase("tiny", 2, 32, dtype="float32", steps=1, warmup=1, variants=tuple(VARIANTS))
    out = run_training(quick=True, cases=[case])
    run = out["runs"]["tiny float32"]
    assert run["peak_gflops"] > 0
    _assert_mfu_of_both_models(run, "float32", run["peak_gflops"] * 1e9)
    assert set(run["ours_variants"]) == set(VARIANTS)
    for r in [run["ours"], run["transformers"], *run["ours_variants"].values()]:
        assert r["tokens_per_s"] > 0 and r["mfu_pct"] > 0
        # Each row is its own process: the peak is at least what its training steps added (gradients, AdamW state).
        assert r["peak_rss_mib"] > r["train_mib"] > 0
    text = report.format_report({"training": out})
    assert "ours MiB" in text and "HF MiB" in text
    for v in VARIANTS:
        [line] = [x for x in text.splitlines() if x.lstrip().startswith(f"tiny float32 +{v} ")]
        assert "-" not in line.split()[2:]  # every figure measured


def test_unknown_option_is_refused_by_name():
    with pytest.raises(ValueError, match="variants: unknown fast"):
        TrainCase("tiny", 1, 16, variants=("fast",))
