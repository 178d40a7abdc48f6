from __future__ import annotations

import os
import stat

import pytest

from bench import anchors
from bench.loadgen import DEFAULT_PROMPTS


def test_transformers_generate_counts_every_forced_token(tiny_checkpoint):
    r = anchors.transformers_generate(
        tiny_checkpoint, "float32", batch=3, max_new_tokens=5, prompts=DEFAULT_PROMPTS, runs=2
    )
    assert (r.batch, r.runs, r.new_tokens) == (3, 2, 3 * 5 * 2)
    assert r.tokens_per_s == pytest.approx(r.new_tokens / r.seconds)
    assert r.ttft_ms is not None and r.ttft_ms > 0


def test_llama_cpp_python_one_stream():
    pytest.importorskip("llama_cpp")
    from model.bundled import bundled_gguf_path

    r = anchors.llama_cpp_python_stream(bundled_gguf_path(), max_tokens=6, prompts=DEFAULT_PROMPTS, runs=2, threads=2)
    assert (r.batch, r.runs, r.new_tokens) == (1, 2, 12)
    assert r.tokens_per_s > 0 and r.ttft_ms > 0


def test_find_llama_server(monkeypatch, tmp_path):
    monkeypatch.setattr(anchors, "DEPS_DIR", tmp_path / "deps")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    with pytest.raises(anchors.AnchorUnavailable, match="llama-server not found.*bench/deps.sh"):
        anchors.find_llama_server()
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("LLAMA_SERVER", os.fspath(binary))
    assert anchors.find_llama_server() == binary
