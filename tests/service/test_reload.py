"""Hot reload from a trainer output directory, and checkpoint resolution."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from model.run_dir import write_summary
from service.checkpoints import newest_checkpoint, resolve_checkpoint
from tests.service.conftest import LiveServer, slow_down, tiny_settings, wait_until


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
        [info] = [line for line in metrics.splitlines() if line.startswith("smollm_model_info{")]
        assert f'checkpoint="{out / "step-000003"}"' in info and 'step="3"' in info and info.endswith(" 1.0")
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


# ---- fail-safe reloads: the watcher against an engine driven by hand (no thread, no HTTP) ----


def _watched(tmp_path, save_tiny, tokenizer, **watcher_kw):
    """A trainer output dir with step 1 served by an engine, and a watcher on it."""
    from model.checkpoint import load_model
    from service.engine import Engine
    from service.engine.loop import ModelInfo
    from service.reload import CheckpointWatcher

    out = tmp_path / "run"
    first = save_tiny(out / "step-000001", seed=0)
    loads = []

    def loader(path):
        loads.append(path)
        return load_model(path), tokenizer

    model, _ = loader(first)
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=2,
        max_context=64,
        max_queue=4,
        prefill_chunk=64,
        info=ModelInfo(str(first), "1", first.name),
    )
    watcher = CheckpointWatcher(out, engine, loader, interval=1, current=first, **watcher_kw)
    return out, engine, watcher, loads


def _nan_checkpoint(path: Path, tokenizer) -> Path:
    import torch

    from model.checkpoint import save_checkpoint
    from tests.service.conftest import tiny_model

    model = tiny_model(2)
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[0, 0] = float("nan")
    return save_checkpoint(path, model, tokenizer=tokenizer)


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, save_tiny, tokenizer):
    out, engine, watcher, _ = _watched(tmp_path, save_tiny, tokenizer)
    failures = []
    engine.on_reload_failed.append(lambda reason, msg: failures.append((reason, msg)))
    _nan_checkpoint(out / "step-000002", tokenizer)
    assert not watcher.poll_once()
    assert not engine.swap_pending and engine.reload_failures["non_finite"] == 1
    assert failures[0][0] == "non_finite" and "layers.1.feed_forward.w2.weight" in failures[0][1]
    assert not watcher.poll_once()  # refused for good: not loaded again
    save_tiny(out / "step-000003", seed=1)  # the next good one is taken
    assert watcher.poll_once()
    engine.step()
    assert engine.info.step == "3" and watcher.current == out / "step-000003"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_nan_checkpoint_is_refused_when_served_quantized(tmp_path, save_tiny, tokenizer, quant):
    """Quantizing would round the NaN away (or hide it in packed integers): it is found before."""
    from model.checkpoint import load_model
    from model.quant import quantize_model

    out, engine, watcher, _ = _watched(tmp_path, save_tiny, tokenizer)

    def quantized(path):
        model = load_model(path)
        quantize_model(model, quant)
        return model, tokenizer

    watcher.loader = quantized
    _nan_checkpoint(out / "step-000002", tokenizer)
    assert not watcher.poll_once()
    assert engine.reload_failures["non_finite"] == 1 and not engine.swap_pending
    save_tiny(out / "step-000003", seed=1)
    assert watcher.poll_once()  # a finite one quantizes and is taken


def test_nan_weights_are_found_in_packed_linears_too(tmp_path, tokenizer):
    import pytest
    import torch

    from model.checkpoint import load_model
    from model.packed_linear import pack_linears
    from service.reload import non_finite_weights

    if not torch.backends.mkldnn.is_available():
        pytest.skip("needs oneDNN")
    model = load_model(_nan_checkpoint(tmp_path / "nan", tokenizer))
    assert pack_linears(model) > 0
    assert non_finite_weights(model) == ["layers.1.feed_forward.w2.packed"]


def test_infinities_are_found_and_huge_finite_weights_are_not_refused():
    """The check sums each tensor first: an infinity (or a +inf/-inf pair) is still found, and finite weights whose
    sum overflows are checked element by element rather than refused."""
    import torch

    from service.reload import non_finite_weights
    from tests.service.conftest import tiny_model

    model = tiny_model(0)
    with torch.no_grad():
        model.layers[0].attention.wo.weight.fill_(3e38)  # finite, but its sum is inf
        assert non_finite_weights(model) == []
        model.layers[1].feed_forward.w2.weight[0, :2] = torch.tensor([float("inf"), float("-inf")])
        model.norm.weight[0] = float("-inf")
    assert non_finite_weights(model) == ["layers.1.feed_forward.w2.weight", "norm.weight"]


def test_a_failed_swap_is_retried_and_the_checkpoint_becomes_current_only_when_served(tmp_path, save_tiny, tokenizer):
    out, engine, watcher, loads = _watched(tmp_path, save_tiny, tokenizer, retry_after=3600)
    second = save_tiny(out / "step-000002", seed=1)
    real_set_model = engine.runner.set_model

    def out_of_memory(model):
        raise RuntimeError("out of memory")

    engine.runner.set_model = out_of_memory
    assert watcher.poll_once()
    engine.step()  # the swap fails: the old model keeps serving
    assert engine.info.step == "1" and engine.reload_failures["swap"] == 1
    assert watcher.current == out / "step-000001"  # not marked current
    assert not watcher.poll_once() and loads.count(second) == 1  # and not retried before retry_after
    watcher.retry_after = 0
    watcher._retry_at.clear()
    engine.runner.set_model = real_set_model
    assert watcher.poll_once()
    assert watcher.current == out / "step-000001"  # handed over, not yet served
    engine.step()
    assert not watcher.poll_once() and watcher.current == second and engine.info.step == "2"


def _write_state(ckpt: Path, val_loss) -> None:
    """What the trainer records with each checkpoint (trainer/checkpointing.py through model.run_dir)."""
    write_summary(ckpt, {"step": 1, "val_loss": val_loss, "val_loss_step": 1})


def test_recorded_validation_loss_gates_a_reload(tmp_path, save_tiny, tokenizer):
    out, engine, watcher, _ = _watched(tmp_path, save_tiny, tokenizer, max_loss_increase=0.5)
    _write_state(out / "step-000001", 2.0)
    nan = save_tiny(out / "step-000002", seed=1)
    _write_state(nan, float("nan"))
    assert not watcher.poll_once() and engine.reload_failures["val_loss"] == 1
    worse = save_tiny(out / "step-000003", seed=1)
    _write_state(worse, 2.6)
    assert not watcher.poll_once() and engine.reload_failures["val_loss"] == 2
    ok = save_tiny(out / "step-000004", seed=1)
    _write_state(ok, 2.4)
    assert watcher.poll_once()
    engine.step()
    assert engine.info.step == "4"
    # No recorded loss, or no margin set: no gate (a non-finite loss is refused regardless).
    save_tiny(out / "step-000005", seed=0)
    assert watcher.poll_once()


def test_without_a_margin_only_non_finite_losses_are_refused(tmp_path, save_tiny, tokenizer):
    out, engine, watcher, _ = _watched(tmp_path, save_tiny, tokenizer)
    _write_state(out / "step-000001", 1.0)
    inf = save_tiny(out / "step-000002", seed=1)
    _write_state(inf, float("inf"))
    assert not watcher.poll_once() and engine.reload_failures["val_loss"] == 1
    worse = save_tiny(out / "step-000003", seed=1)
    _write_state(worse, 50.0)
    assert watcher.poll_once()
