"""bench.quality: perplexity and greedy agreement per mode, and the quality bounds on the real model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import quality
from model.device import dtype_name
from model.quant import serving_dtype
from model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def test_heldout_text_makes_whole_windows(tokenizer):
    windows = quality.heldout_windows(tokenizer, quality.HELDOUT.read_text())
    assert windows.shape[1] == quality.WINDOW and windows.shape[0] >= 4  # the shipped text is ~6 KB
    with pytest.raises(ValueError, match="fewer than one window of 256"):
        quality.heldout_windows(tokenizer, "Too short.")


def test_prompts_are_spread_over_every_window(tokenizer):
    windows = quality.heldout_windows(tokenizer, quality.HELDOUT.read_text())
    positions = quality.prompt_positions(windows)
    assert len(positions) == len(set(positions)) == quality.PROMPTS
    assert {w for w, _ in positions} == set(range(windows.shape[0]))
    assert all(7 <= pos < windows.shape[1] for _, pos in positions)


def test_evaluate_scores_each_mode_against_fp32(tiny_checkpoint):
    result = quality.evaluate(tiny_checkpoint, ["int8", "int4"])
    modes = result["modes"]
    assert list(modes) == ["float32", "int8", "int4"]  # fp32 first: the reference
    assert modes["float32"]["agreement"] == 1.0
    for mode in ("int8", "int4"):  # in the dtype the server's `auto` serves the mode in
        assert modes[mode]["compute_dtype"] == dtype_name(serving_dtype("auto", torch.device("cpu"), mode))
    for m in modes.values():
        assert math.isfinite(m["perplexity"]) and m["perplexity"] > 1
    # A random tiny model predicts almost uniformly: the perplexity is near the vocabulary size, and
    # quantization moves it by little.
    assert modes["int8"]["perplexity"] == pytest.approx(modes["float32"]["perplexity"], rel=0.05)


def test_score_counts_every_next_token(tiny_checkpoint):
    from model.checkpoint import load_model

    model = load_model(tiny_checkpoint)
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ppl, greedy = quality.score(model, windows, [(0, 7), (1, 15)])
    with torch.inference_mode():
        logits = model(windows).float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert ppl == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert greedy.tolist() == [int(logits[0, 7].argmax()), int(logits[1, 15].argmax())]


def test_perplexity_through_an_fp32_cache_is_the_full_forwards_and_fp16_stays_close(tiny_checkpoint):
    from model.checkpoint import load_model

    model = load_model(tiny_checkpoint).eval()
    windows = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    full, _ = quality.score(model, windows, [(0, 7)])
    through_cache = quality.cached_perplexity(model, windows, torch.float32, chunk=16)  # 3 chunks a window
    assert through_cache == pytest.approx(full, rel=1e-5)
    half = quality.cached_perplexity(model, windows, torch.float16, chunk=16)
    assert half != through_cache and half == pytest.approx(full, rel=1e-3)


def test_kv_cache_dtypes_add_a_cached_row_per_mode(tiny_checkpoint, capsys, tmp_path):
    assert (
        quality.main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--modes",
                "int4",
                "--kv-cache-dtypes",
                "float16",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Through the KV cache" in out
    [row] = [line for line in out.splitlines() if line.strip().startswith("int4  float32")]
    assert "float16" in row
    with pytest.raises(SystemExit):
        quality.main(["--kv-cache-dtypes", "fp8"])
    assert "unknown cache dtype 'fp8'" in capsys.readouterr().err


def test_main_prints_the_table_and_writes_json_with_the_machine(tiny_checkpoint, tmp_path, capsys):
    assert quality.main(["--modes", "int8", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Quality on heldout.txt" in out and "int8" in out and "+1%" in out
    (path,) = tmp_path.glob("quality-*.json")
    data = json.loads(path.read_text())
    machine = data["meta"]["machine"]
    assert machine["isa"] in out and machine["bandwidth_gbs"] > 0 and "float32" in machine["matmul_gflops"]
    assert set(data["quality"]["modes"]) == {"float32", "int8"}


def test_main_rejects_unknown_modes(capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(["--modes", "int8,int3"])
    assert e.value.code == 2
    assert "--modes: choose from float32,bfloat16,int8,int4" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three full passes over the text; minutes on a shared 2-core CPU
@pytest.mark.long
def test_quant_modes_keep_the_real_models_quality():
    from model.bundled import default_checkpoint

    modes = quality.evaluate(default_checkpoint(), ["int8", "int4"])["modes"]
    base = modes["float32"]["perplexity"]
    for mode, bound in quality.PPL_BOUNDS.items():
        assert modes[mode]["perplexity"] <= base * (1 + bound), (mode, modes[mode], base)
        assert modes[mode]["agreement"] >= 0.85, (mode, modes[mode])
