"""Hot reload from a trainer output directory, and checkpoint resolution."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from service.checkpoints import newest_checkpoint, resolve_checkpoint
from tests.service.conftest import LiveServer, metric_value, slow_down, tiny_settings, wait_until


def write_latest(out: Path, name: str) -> None:
    tmp = out / ".latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, out / "latest")


def test_resolution(tmp_path, save_tiny, tiny_checkpoint):
    assert resolve_checkpoint(None).path is None
    direct = resolve_checkpoint(str(tiny_checkpoint))
    assert direct.path == tiny_checkpoint and direct.watch_dir is None
    out = tmp_path / "run"
    missing = resolve_checkpoint(str(out))  # not there yet: embedded model, watched
    assert missing.path is None and missing.watch_dir == out
    out.mkdir()
    (out / ".step-000009.tmp-abc").mkdir()  # a checkpoint being written is ignored
    (out / "step-000003").mkdir()  # incomplete
    assert newest_checkpoint(out) is None
    save_tiny(out / "step-000001")
    save_tiny(out / "step-000002")
    assert newest_checkpoint(out) == out / "step-000002"  # highest complete step without `latest`
    write_latest(out, "step-000001")
    r = resolve_checkpoint(str(out))
    assert r.path == out / "step-000001" and r.watch_dir == out and r.step == "1"
    write_latest(out, "step-000007")  # names a missing checkpoint: fall back to the highest step
    assert newest_checkpoint(out) == out / "step-000002"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="checkpoint"):
        resolve_checkpoint(str(tmp_path / "file"))


def test_hot_reload_swaps_without_failures_and_skips_broken(tmp_path, save_tiny):
    out = tmp_path / "run"
    save_tiny(out / "step-000001", seed=0)
    write_latest(out, "step-000001")
    settings = tiny_settings(out, reload_interval=0.1)
    with LiveServer(settings) as server:
        slow_down(server.engine, 0.002)
        req = {"prompt": "Once upon a time", "temperature": 0, "max_tokens": 40, "ignore_eos": True}
        old_answer = httpx.post(server.url + "/v1/generate", json=req, timeout=30).json()["text"]

        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                return await asyncio.gather(*(c.post("/v1/generate", json=req) for _ in range(6)))

        async def during_swap():
            task = asyncio.ensure_future(burst())
            await asyncio.sleep(0.05)  # requests in flight on the old model
            # A broken checkpoint first: skipped, the old model keeps serving.
            broken = out / "step-000002"
            save_tiny(broken, seed=1)
            (broken / "model.safetensors").write_bytes(b"not a safetensors file")
            write_latest(out, "step-000002")
            await asyncio.sleep(0.5)
            return await task

        responses = asyncio.run(during_swap())
        assert [r.status_code for r in responses] == [200] * 6
        assert [r.json()["text"] for r in responses] == [old_answer] * 6
        assert server.engine.info.step == "1"
        assert httpx.get(server.url + "/readyz").status_code == 200

        async def swap_under_load():
            task = asyncio.ensure_future(burst())
            await asyncio.sleep(0.05)
            save_tiny(out / "step-000003", seed=1)
            write_latest(out, "step-000003")
            return await task

        responses = asyncio.run(swap_under_load())
        assert all(r.status_code == 200 for r in responses)
        assert wait_until(lambda: server.engine.info.step == "3", timeout=20)
        # Every request finished on one model: the old one's answer, or the new one's.
        new_answer = httpx.post(server.url + "/v1/generate", json=req, timeout=30).json()["text"]
        assert new_answer != old_answer
        assert {r.json()["text"] for r in responses} <= {old_answer, new_answer}
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "step-000003"
        metrics = httpx.get(server.url + "/metrics").text
        assert metric_value(metrics, "smollm_model_info", f'checkpoint="{out / "step-000003"}",step="3"') == 1
        assert 'step="1"' not in metrics


def test_trainer_dir_without_checkpoint_serves_the_embedded_model_until_one_appears(tmp_path, save_tiny):
    from service.app import build_engine

    out = tmp_path / "empty-run"
    engine, watcher = build_engine(tiny_settings(out, reload_interval=1))
    assert watcher is not None and engine.info.name == "SmolLM2-135M-Instruct"
    assert not watcher.poll_once()
    save_tiny(out / "step-000005")
    assert watcher.poll_once()
    assert engine.swap_pending
    engine.step()  # nothing running: the swap happens at once
    assert engine.info.step == "5" and engine.vocab_size == 49152 and engine.runner.model.config.n_layer == 2
