"""End-to-end training runs in-process on the tiny preset: learning, checkpoint layout, exact resume,
fallback past a broken checkpoint, retention."""

import shutil

import pytest
import torch

from model.checkpoint import load_model
from model.run_dir import LATEST_FILE, STATE_FILE, read_latest
from trainer import distributed
from trainer.loop import measure_throughput, prepare, run
from trainer.out_lock import LOCK_FILE
from trainer.plot import PLOT_FILE, plot_loss
from trainer.progress import read_metrics
from trainer.state import restore_or_init


def test_measure_throughput(make_config):
    assert measure_throughput(make_config(), steps=2, warmup=1) > 0


def train(cfg, out):
    return run(prepare(cfg), out)


def test_loss_goes_down_on_a_tiny_overfit_run(make_config, tmp_path, losses):
    out = tmp_path / "out"
    cfg = make_config(
        "max_steps=30",
        "checkpoint_every=30",
        "optim.lr=1e-2",
        "optim.warmup_steps=3",
        "eval_every=15",
        "data.val_fraction=0.1",
        "eval_steps=2",
        "sample_every=15",
        "sample_tokens=4",
    )
    summary = train(cfg, out)
    seen = losses(out)
    assert sorted(seen) == list(range(1, 31))
    assert seen[30] < 0.5 * seen[1], seen
    assert summary.final_step == 30 and summary.tokens_per_s > 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [15, 30]
    samples = [r for r in records if "samples" in r]
    assert [r["step"] for r in samples] == [15, 30] and samples[0]["samples"][0]["prompt"] == "def "
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    pytest.importorskip("matplotlib")
    assert plot_loss(out) == out / PLOT_FILE and (out / PLOT_FILE).stat().st_size > 0


def test_checkpoint_loads_in_transformers(make_config, tmp_path, losses):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    train(make_config("max_steps=2", "checkpoint_every=2"), out)
    assert read_latest(out) == "step-000002"
    ckpt = out / "step-000002"
    assert (ckpt / STATE_FILE).is_file() and (ckpt / "trainer_config.yaml").is_file()
    hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = torch.tensor([tok.encode("the quick brown fox")])
    ours = load_model(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


def test_resume_is_bit_exact_and_skips_a_broken_newest_checkpoint(make_config, tmp_path, losses):
    cfg = make_config("max_steps=8", "checkpoint_every=2", "keep_last=10", "grad_accum=2")
    full = tmp_path / "full"
    train(cfg, full)
    reference = losses(full)
    assert sorted(reference) == list(range(1, 9))

    # A copy of the run as if it had died after step 6's checkpoint, with that checkpoint corrupted.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "step-000008")
    weights = resumed / "step-000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (resumed / LATEST_FILE).write_text("step-000006\n")
    summary = train(cfg, resumed)
    assert summary.start_step == 4 and summary.resumed_from.name == "step-000004"
    again = losses(resumed)
    assert again == reference  # float equality: bit-exact
    final_a = load_model(full / "step-000008").state_dict()
    final_b = load_model(resumed / "step-000008").state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_retention_keeps_the_newest(make_config, tmp_path, losses):
    out = tmp_path / "out"
    train(make_config("max_steps=8", "checkpoint_every=2", "keep_last=2"), out)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["step-000006", "step-000008"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [LOCK_FILE]  # no debris, only the lock
    assert read_latest(out) == "step-000008"
    # Rerunning a finished job changes nothing.
    summary = train(make_config("max_steps=8", "checkpoint_every=2", "keep_last=2"), out)
    assert summary.start_step == 8 and sorted(losses(out)) == list(range(1, 9))


def test_resume_applies_the_configs_optimizer_hyperparameters(make_config, tmp_path):
    out = tmp_path / "out"
    train(make_config("max_steps=2", "checkpoint_every=2"), out)
    changed = make_config("max_steps=4", "optim.betas=[0.8, 0.9]", "optim.eps=1e-6", "optim.weight_decay=0.2")
    prep = prepare(changed)
    state = restore_or_init(changed, prep.source, prep.train_tokens, out, distributed.setup("cpu"))
    assert state.step == 2 and state.saved  # resumed, the saved moments loaded
    decay, no_decay = state.optimizer.param_groups
    for group in (decay, no_decay):
        assert tuple(group["betas"]) == (0.8, 0.9) and group["eps"] == 1e-6
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert state.optimizer.state[decay["params"][0]]["exp_avg"].abs().sum() > 0
