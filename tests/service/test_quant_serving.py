"""Weight-only quantized serving end to end on the tiny model: each mode loads, answers, streams, reports itself
and survives a hot reload (the new checkpoint is quantized the same way)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from pydantic import ValidationError

from model import native
from model.quant import Int4Linear, Int8Linear, pick_int4_kernel, pick_int8_kernel
from model.run_dir import write_latest
from service.settings import Settings
from tests.service.conftest import LiveServer, tiny_settings, wait_until

LAYER = {"int8": Int8Linear, "int4": Int4Linear}


def quantized_layers(model) -> dict[type, int]:
    counts: dict[type, int] = {}
    for m in model.modules():
        if isinstance(m, Int8Linear | Int4Linear):
            counts[type(m)] = counts.get(type(m), 0) + 1
    return counts


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quant_mode_serves_streams_and_reports_itself(make_client, mode):
    with make_client(quant=mode) as c:
        model = c.app.state.engine.runner.model
        assert quantized_layers(model).get(LAYER[mode], 0) > 0
        req = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        whole = c.post("/v1/generate", json=req)
        assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 8
        with c.stream("POST", "/v1/generate", json={**req, "stream": True}) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        # Greedy: the stream carries the same text as the JSON answer.
        assert "".join(e.get("text", "") for e in events[:-1]) == whole.json()["text"]
        info = c.get("/v1/models").json()["data"][0]["smollm"]
        assert info["quant"] == mode and info["dtype"] == "float32"
        # auto: an fp16 KV cache under quantized weights (half the bytes for attention to read)
        assert info["kv_cache_dtype"] == "float16" and c.app.state.engine.runner.cache.k.dtype == torch.float16
        metrics = c.get("/metrics").text
        assert f'quant="{mode}"' in metrics and 'kv_cache_dtype="float16"' in metrics
        # The kernels are named, so that a measurement says what ran (the output projection is int8 in int4 mode).
        int8 = f"int8 {pick_int8_kernel()}"
        int4 = f"int4 native {native.q4_isa()}" if pick_int4_kernel() == "native" else "int4 aten"
        kernels = {"int8": int8, "int4": f"{int4}, {int8}"}[mode]
        assert info["linear_kernels"] == kernels and f'linear_kernels="{kernels}"' in metrics


def test_an_explicit_kv_cache_dtype_wins_and_a_bad_one_is_named(make_client):
    with make_client(quant="int4", kv_cache_dtype="float32") as c:
        assert c.app.state.engine.runner.cache.k.dtype == torch.float32
        assert c.get("/v1/models").json()["data"][0]["smollm"]["kv_cache_dtype"] == "float32"
        req = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        assert c.post("/v1/generate", json=req).status_code == 200
    with pytest.raises(ValidationError, match="kv_cache_dtype"):
        Settings(kv_cache_dtype="fp8")


def test_quantized_server_hot_reloads_into_a_quantized_model(tmp_path, save_tiny):
    out = tmp_path / "run"
    save_tiny(out / "step-000001", seed=0)
    write_latest(out, "step-000001")
    with LiveServer(tiny_settings(out, reload_interval=0.1, quant="int4")) as server:
        req = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        before = httpx.post(server.url + "/v1/generate", json=req, timeout=30).json()["text"]
        save_tiny(out / "step-000002", seed=1)
        write_latest(out, "step-000002")
        assert wait_until(lambda: server.engine.info.step == "2", timeout=30)
        assert quantized_layers(server.engine.runner.model).get(Int4Linear, 0) > 0
        assert server.engine.runner.cache.k.dtype == torch.float16  # the swap kept the cache's dtype
        after = httpx.post(server.url + "/v1/generate", json=req, timeout=30)
        assert after.status_code == 200 and after.json()["text"] != before
