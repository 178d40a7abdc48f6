from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.__main__ import parse_args, serving_modes


def _level(c: int, tps: float, ttft: float) -> dict:
    return {
        "concurrency": c,
        "requests": 4,
        "completed": 4,
        "errors": 0,
        "cut_off": 0,
        "completion_tokens": 512,
        "wall_s": 512 / tps,
        "tokens_per_s": tps,
        "ttft_p50_ms": ttft,
        "ttft_p95_ms": ttft * 2,
        "itl_p50_ms": 10.0,
        "itl_p95_ms": 20.0,
        "mean_tokens_per_request": 128.0,
        "finish_reasons": {"length": 4},
        "error_samples": [],
    }


@pytest.fixture
def results() -> dict:
    return {
        "meta": {"date": "2026-11-29 05:40 UTC", "machine": "2-core CPU", "command": "python -m bench"},
        "ceiling": {
            "bandwidth_gbs": 20.0,
            "threads": 2,
            "params": 134_515_008,
            "matmul_gflops": {"bfloat16": 500.0},
            "single_stream_tokens_per_s": {"bfloat16": 75.0, "gguf": 200.0},
            "batch_tokens_per_s": {"bfloat16": 1800.0},
        },
        "serving": {
            "bfloat16": {
                "ours": {"1": _level(1, 50.0, 40.0), "16": _level(16, 450.0, 250.0)},
                "served": {"dtype": "bfloat16", "linear_kernels": "bf16 native AMX"},
            },
            "float32": {"ours": {"skipped": "service exited with code 1"}},
        },
        "anchors": {
            "transformers": {
                "bfloat16": {
                    "batch1": {"batch": 1, "tokens_per_s": 20.0, "ttft_ms": 60.0},
                    "batch16": {"batch": 16, "tokens_per_s": 225.0, "ttft_ms": 300.0},
                },
                "float32": {"skipped": "failed: OSError: no weights"},
            },
            "llama_cpp_python": {"skipped": "llama-cpp-python is not installed"},
            "llama_server": {"levels": {"1": _level(1, 100.0, 30.0), "16": _level(16, 150.0, 500.0)}},
        },
        "training": {
            "ours_impl": "x",
            "anchor_impl": "y",
            "runs": {
                "tiny float32": {
                    "batch_size": 8,
                    "seq_len": 256,
                    "ours": {"tokens_per_s": 3000.0, "mfu_pct": 2.0},
                    "transformers": {"tokens_per_s": 2000.0, "mfu_pct": 1.3},
                }
            },
        },
    }


def test_table_shows_values_ratios_targets_and_why_anchors_did_not_run(results):
    text = report.format_report(results)
    assert "2026-11-29 05:40 UTC" in text and "python -m bench" in text
    assert "0.50x" in text  # ours/llama.cpp at one stream: 50 / 100
    assert "2.50x" in text  # ours/HF at one stream: 50 / 20
    assert "3.00x" in text  # ours/llama.cpp at 16 streams: 450 / 150
    assert "2.00x" in text  # ours/HF static batch 16: 450 / 225
    assert "67%" in text  # one stream: 50 of a 75 tok/s bandwidth bound
    # The targets, per served mode, where both sides of a ratio were measured (no llama-cpp-python here).
    assert "bfloat16: 16 streams 3.00x llama-server (>= 2x), TTFT p50 250 ms (<= 300): PASS" in text
    assert "one stream" not in text.split("Targets")[1] and "float32:" not in text.split("Targets")[1]
    assert "Serving float32: ours not measured (service exited with code 1)" in text
    assert "Serving bfloat16 (ours: /v1/generate SSE, stops at EOS on bf16 native AMX;" in text  # what ran
    assert "llama-cpp-python anchor not run: llama-cpp-python is not installed" in text
    assert "transformers anchor (float32) not run: failed: OSError: no weights" in text
    assert "1.50x" in text  # training ours/HF


def test_targets_name_each_miss(results):
    results["anchors"]["llama_cpp_python"] = {"tokens_per_s": 40.0, "ttft_ms": 20.0}
    results["serving"]["bfloat16"]["ours"]["64"] = _level(64, 500.0, 1200.0)
    results["anchors"]["llama_server"]["levels"]["64"] = _level(64, 180.0, 9000.0)
    targets = report.format_report(results).split("Targets")[1].splitlines()[1]
    assert "one stream 1.25x llama-cpp-python (>= 1x): PASS" in targets
    assert "TTFT 2.00x its (<= 1.5x): MISS" in targets  # 40 ms against 20
    assert "64 streams 2.78x llama-server (>= 2.5x), TTFT p50 1200 ms (<= 1000): MISS" in targets


def test_json_and_plot(results, tmp_path):
    pytest.importorskip("matplotlib")
    path = report.write_json(results, tmp_path / "r.json")
    assert json.loads(path.read_text()) == results
    png = report.plot(results, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--only", "serving,bogus"])
    assert "choose from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--concurrency", "1,0"])
    with pytest.raises(SystemExit):
        parse_args(["--dtypes", "float64"])
    with pytest.raises(SystemExit):
        parse_args(["--quants", "int3"])
    args = parse_args(["--quick"])
    assert (args.concurrency, args.max_tokens, args.dtypes) == ([1, 4], 16, ["bfloat16", "float32"])
    assert args.quants == ["int8", "int4"]


def test_serving_modes_add_each_quant_on_the_auto_dtype():
    assert serving_modes(parse_args(["--dtypes", "float32", "--quants", "int8,int4"])) == [
        ("float32", "float32", "none"),
        ("int8", "auto", "int8"),
        ("int4", "auto", "int4"),
    ]
    assert serving_modes(parse_args(["--dtypes", "bfloat16", "--quants", "none"])) == [("bfloat16", "bfloat16", "none")]


def test_cli_ceiling_only_writes_json_and_prints_the_table(tmp_path):
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "ceiling", "--dtypes", "float32", "--out", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "read bandwidth" in proc.stdout and "1-stream bound" in proc.stdout
    (json_file,) = tmp_path.glob("*.json")
    data = json.loads(json_file.read_text())
    assert data["ceiling"]["bandwidth_gbs"] > 0 and set(data["ceiling"]["matmul_gflops"]) == {"float32"}
    assert {"int8", "int4", "gguf"} <= set(data["ceiling"]["single_stream_tokens_per_s"])
    assert "int4 (weight-only)" in proc.stdout
    # The machine is named with its ISA, bandwidth and FLOP/s, in the JSON and in the printed heading.
    machine = data["meta"]["machine_record"]
    assert machine["isa"] and machine["bandwidth_gbs"] == data["ceiling"]["bandwidth_gbs"]
    assert f"{machine['isa']};" in proc.stdout.splitlines()[0] and "GB/s" in proc.stdout.splitlines()[0]
