"""Sharded (DCP) checkpoints: exact resume on 2 FSDP processes, atomic writes, and a Hugging Face export that
`transformers` loads with the trained model's logits."""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import WEIGHTS_FILE, CheckpointError
from trainer.sharded_checkpoint import export_hf_from_sharded, is_complete_sharded, load_sharded, save_sharded

_spec = importlib.util.spec_from_file_location("fsdp_worker", Path(__file__).with_name("fsdp_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def test_two_process_resume_is_exact_and_the_export_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    worker.launch("train", tmp_path)  # 4 steps, sharded checkpoints at 2 and 4, HF export at 4
    uninterrupted = worker.read_losses(tmp_path / "losses.json")
    assert is_complete_sharded(tmp_path / "ckpt-2")
    assert sorted(p.name for p in (tmp_path / "ckpt-2").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind

    worker.launch("resume", tmp_path)  # fresh processes and models, loaded from step 2
    resumed = worker.read_losses(tmp_path / "resume_losses.json")
    assert sorted(resumed) == [3, 4]
    for step, loss in resumed.items():
        assert loss == uninterrupted[step], (step, loss, uninterrupted[step])

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    x = worker.batch(99, 0, 1)[0][:2]
    with torch.no_grad():
        logits = hf(x).logits
    torch.testing.assert_close(logits, torch.load(tmp_path / "logits.pt"), rtol=1e-4, atol=1e-4)

    # The same weights exported offline, in one process, from the sharded checkpoint of step 4.
    offline = export_hf_from_sharded(tmp_path / "ckpt-4", tmp_path / "hf-offline")
    a, b = load_file(tmp_path / "hf" / WEIGHTS_FILE), load_file(offline / WEIGHTS_FILE)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _trained(steps=1):
    torch.manual_seed(0)
    model = worker.build()
    optimizer = worker.optimizer_for(model)
    worker.train(model, optimizer, range(steps))
    return model, optimizer


def test_single_process_round_trip_continues_identically(tmp_path):
    model, optimizer = _trained()
    rng = torch.get_rng_state()
    path = save_sharded(tmp_path / "ckpt", model, optimizer, {"step": 1}, {"rng": rng})
    assert path == (tmp_path / "ckpt").absolute()
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    fresh = worker.build(seed=11)  # different weights, empty optimizer state
    fresh_opt = worker.optimizer_for(fresh)
    state, rank_state = load_sharded(path, fresh, fresh_opt)
    assert state == {"step": 1, "world_size": 1}
    assert torch.equal(rank_state["rng"], rng)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
    expected = worker.train(model, optimizer, range(1, 3))
    assert worker.train(fresh, fresh_opt, range(1, 3)) == expected

    weights_only = worker.build(seed=12)
    load_sharded(path, weights_only)  # no optimizer: the model alone
    for name, p in weights_only.named_parameters():
        assert torch.equal(p, saved[name]), name


def test_a_failed_write_leaves_nothing_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _trained()
    target = tmp_path / "ckpt"
    save_sharded(target, model, optimizer, {"step": 1})
    before = sorted(p.name for p in target.iterdir())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("torch.distributed.checkpoint.save", disk_full)  # what save_sharded calls
    with pytest.raises(OSError, match="No space"):
        save_sharded(target, model, optimizer, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no hidden temp dir
    assert sorted(p.name for p in target.iterdir()) == before
    fresh = worker.build()
    assert load_sharded(target, fresh, worker.optimizer_for(fresh))[0]["step"] == 1


def test_incomplete_checkpoint_is_refused_with_the_missing_files_named(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "__0_0.distcp").write_bytes(b"partial")
    with pytest.raises(CheckpointError, match="not a complete sharded checkpoint"):
        load_sharded(tmp_path / "ckpt", worker.build())
    with pytest.raises(CheckpointError, match="not a complete sharded checkpoint"):
        export_hf_from_sharded(tmp_path / "ckpt", tmp_path / "hf")
