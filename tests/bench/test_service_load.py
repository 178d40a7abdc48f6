"""The load generator and the server harness against our real service on a tiny checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.__main__ import drive, served_precision, supports_ignore_eos
from bench.server import ServerError, smollm_server


def test_drive_our_service_on_the_tiny_model(tiny_checkpoint, tmp_path):
    args = argparse.Namespace(
        max_tokens=12, time_limit=60.0, concurrency=[1, 4], min_requests=2, distinct_prompts=False
    )
    with smollm_server(tiny_checkpoint, "float32", tmp_path / "service.log") as server:
        assert supports_ignore_eos(server.base_url)
        served = served_precision(server.base_url)  # what a result records next to the requested mode
        assert served is not None and served["dtype"] == served["kv_cache_dtype"] == "float32"
        levels = drive(server, args, "smollm", {"ignore_eos": True}, metrics=True)
        openai_levels = drive(server, argparse.Namespace(**{**vars(args), "concurrency": [2]}), "openai", None)
    assert set(levels) == {"1", "4"}
    assert levels["4"]["mean_tokens_per_request"] == 12 and levels["4"]["finish_reasons"] == {"length": 4}
    for c, s in {**levels, "openai-2": openai_levels["2"]}.items():
        assert s["errors"] == 0, (c, s["error_samples"])
        assert s["completed"] == s["requests"] == max(int(c.split("-")[-1]), 2)
        assert 0 < s["mean_tokens_per_request"] <= 12
        assert s["tokens_per_s"] > 0 and s["ttft_p50_ms"] > 0
    # The server's own batch-size histogram: 4 concurrent streams share decode steps.
    assert levels["1"]["mean_batch_size"] == pytest.approx(1.0)
    assert levels["4"]["mean_batch_size"] > 1.0


def test_served_precision_is_none_for_a_server_that_does_not_say(monkeypatch):
    import httpx

    def refused(url, timeout):
        raise httpx.ConnectError("refused")

    monkeypatch.setattr(httpx, "get", refused)
    assert served_precision("http://127.0.0.1:9") is None


def test_a_server_that_cannot_start_says_why(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    server = smollm_server(broken, "float32", tmp_path / "service.log")
    server.start_timeout = 60
    with pytest.raises(ServerError, match="exited with code|not ready"):
        server.start()
    server.stop()


def test_quant_modes_reach_the_server_as_smollm_quant(tmp_path):
    plain = smollm_server(Path("ck"), "float32", tmp_path / "a.log")
    assert "SMOLLM_QUANT" not in plain.env and plain.env["SMOLLM_DTYPE"] == "float32"
    quant = smollm_server(Path("ck"), "auto", tmp_path / "b.log", quant="int4")
    assert quant.env["SMOLLM_QUANT"] == "int4" and quant.env["SMOLLM_DTYPE"] == "auto"
    assert quant.name == "smollm service (int4, auto)"
