"""The bench's in-process sections (issue 13): prefix-reuse TTFT ratio and the structured-output mask cost, on the
tiny checkpoint, through their functions, the report and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import prefix_reuse, report, structured
from bench.__main__ import parse_args
from model.checkpoint import load_model
from model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads on a shared CPU
    yield load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    torch.set_num_threads(before)


def test_prefix_reuse_measures_both_turns_and_their_ratio(tiny):
    model, tokenizer = tiny
    r = prefix_reuse.measure(model, tokenizer, prompt_tokens=100, answer_tokens=6, runs=2)
    assert 80 <= r["turn1_prompt_tokens"] <= 120  # about what was asked, templated
    assert r["turn2_prompt_tokens"] > r["turn1_prompt_tokens"]
    # Turn 2 found turn 1's prompt in the slot turn 1 freed (up to where the template re-tokenizes the answer).
    assert 0.9 * r["turn1_prompt_tokens"] <= r["turn2_reused_tokens"] < r["turn2_prompt_tokens"]
    assert r["turn1_ttft_ms"] > 0 and r["turn2_ttft_ms"] > 0 and r["turn2_cold_ttft_ms"] > 0
    assert r["ratio"] == pytest.approx(r["turn2_ttft_ms"] / r["turn1_ttft_ms"])
    assert (r["runs"], r["target_ratio"], r["threads"]) == (2, 0.3, 1)
    with pytest.raises(ValueError, match="prompt_tokens"):  # the tiny model's 256-token context
        prefix_reuse.measure(model, tokenizer, prompt_tokens=400, runs=1)


def test_structured_times_the_mask_of_each_format(tiny):
    model, tokenizer = tiny
    r = structured.measure(model, tokenizer, max_tokens=12)
    assert set(r["formats"]) == {"json_object", "json_schema"}
    assert r["plain_decode_ms_per_token"] > 0 and r["tokenizer_table_ms"] >= 0
    for f in r["formats"].values():
        assert 1 <= f["steps"] <= 12
        assert f["first_mask_ms"] > 0 and 0 < f["mask_ms_p50"] <= f["mask_ms_p95"]
        assert 0 < f["fill_ms_p50"] and f["accept_ms_p50"] > 0
        # The output followed the grammar: a prefix of JSON, complete when the request stopped on its own.
        assert f["output"].startswith("{")
        assert f["valid_json"] == (f["finish_reason"] == "stop")
    one = structured.measure(model, tokenizer, max_tokens=4, formats=["json_schema"])
    assert set(one["formats"]) == {"json_schema"} and one["formats"]["json_schema"]["steps"] <= 4


def _results(ratio: float) -> dict:
    return {
        "meta": {"date": "d", "machine": "m", "command": "python -m bench"},
        "prefix_reuse": {
            "threads": 2,
            "dtype": "float32",
            "prefill_chunk": 512,
            "runs": 3,
            "turn1_prompt_tokens": 1510,
            "turn2_prompt_tokens": 1560,
            "turn2_reused_tokens": 1540,
            "turn1_ttft_ms": 3000.0,
            "turn2_ttft_ms": 3000.0 * ratio,
            "turn2_cold_ttft_ms": 3100.0,
            "ratio": ratio,
            "target_ratio": 0.3,
        },
        "structured": {
            "threads": 2,
            "dtype": "float32",
            "tokenizer_table_ms": 2500.0,
            "plain_decode_ms_per_token": 40.0,
            "formats": {
                "json_schema": {
                    "compile_ms": 12.0,
                    "steps": 30,
                    "first_mask_ms": 9.5,
                    "mask_ms_p50": 0.123,
                    "mask_ms_p95": 0.456,
                    "fill_ms_p50": 0.031,
                    "accept_ms_p50": 0.02,
                    "decode_ms_per_token": 41.5,
                    "valid_json": True,
                }
            },
        },
    }


def test_report_rows_and_verdict():
    text = report.format_report(_results(0.05))
    assert "turn 2 / turn 1 TTFT 0.05x (target <= 0.3x" in text and "PASS" in text
    assert "1540" in text and "3100" in text  # reused tokens, the cold turn 2
    assert "json_schema" in text and "0.123/0.456" in text and "41.5" in text and "yes" in text
    assert "MISS" in report.format_report(_results(0.5))
    skipped = report.format_report({"prefix_reuse": {"skipped": "model not loaded: X"}, "structured": {"skipped": "Y"}})
    assert "Prefix reuse: not measured (model not loaded: X)" in skipped
    assert "Structured output: not measured (Y)" in skipped


def test_sections_are_selected_and_skipped():
    assert parse_args([]).only[-2:] == ["prefix_reuse", "structured"]
    args = parse_args(["--skip", "serving,anchors,training,ceiling"])
    assert args.only == ["prefix_reuse", "structured"] and args.prefix_tokens == 1500
    assert parse_args(["--quick"]).structured_tokens == 24
    with pytest.raises(SystemExit):
        parse_args(["--only", "structured", "--skip", "structured"])
    with pytest.raises(SystemExit):
        parse_args(["--skip", "bogus"])


def test_cli_runs_the_engine_sections(tiny_checkpoint, tmp_path):
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "bench", "--quick", "--only", "prefix_reuse,structured", "--threads", "1"]
    cmd += ["--checkpoint", str(tiny_checkpoint), "--prefix-tokens", "100", "--structured-tokens", "6"]
    proc = subprocess.run(cmd + ["--out", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (json_file,) = tmp_path.glob("*.json")
    data = json.loads(json_file.read_text())
    assert data["meta"]["sections"] == ["prefix_reuse", "structured"]
    assert data["prefix_reuse"]["turn2_reused_tokens"] > 0 and data["prefix_reuse"]["runs"] == 1
    assert set(data["structured"]["formats"]) == {"json_object", "json_schema"}
    assert "turn 2 / turn 1 TTFT" in proc.stdout and "mask ms/step p50/p95" in proc.stdout
    assert "Serving" not in proc.stdout and "Training" not in proc.stdout
