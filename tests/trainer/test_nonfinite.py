"""A diverging run never reaches the server: non-finite steps update nothing, a run of them stops the job with
exit 1, non-finite weights are never written, and each checkpoint records its validation loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import run_dir
from model.checkpoint import load_model
from trainer import loop
from trainer.__main__ import main
from trainer.loop import prepare, run
from trainer.nonfinite import DivergedError
from trainer.progress import METRICS_FILE, read_metrics


@pytest.fixture
def poison_steps(monkeypatch):
    """Make the training loss NaN at the given 1-based steps (grad_accum=1: one loss per step)."""
    steps: set[int] = set()
    calls = {"n": 0}
    real = F.cross_entropy

    def cross_entropy(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():  # training, not evaluation
            calls["n"] += 1
            if calls["n"] in steps:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(loop.F, "cross_entropy", cross_entropy)
    return steps


def _optimizer_steps(checkpoint) -> int:
    state = torch.load(checkpoint / run_dir.STATE_FILE, weights_only=False)
    return int(next(iter(state["optimizer"]["state"].values()))["step"])


def test_a_nonfinite_step_updates_nothing_and_training_goes_on(make_config, tmp_path, poison_steps):
    poison_steps.add(3)
    out = tmp_path / "out"
    summary = run(prepare(make_config("max_steps=4", "checkpoint_every=2")), out)
    assert summary.final_step == 4 and run_dir.read_latest(out) == "step-000004"
    records = {r["step"]: r for r in read_metrics(out / METRICS_FILE)}
    assert math.isnan(records[3]["loss"]) and math.isfinite(records[4]["loss"])
    assert _optimizer_steps(out / "step-000002") == 2
    assert _optimizer_steps(out / "step-000004") == 3  # step 3's update was skipped
    assert all(t.isfinite().all() for t in load_model(out / "step-000004").state_dict().values())


def test_too_many_nonfinite_steps_in_a_row_stop_the_job(config_file, tmp_path, poison_steps, capsys):
    poison_steps.update(range(3, 100))
    out = tmp_path / "out"
    rc = main(
        ["--config", str(config_file("max_steps=8", "checkpoint_every=2", "max_nonfinite_steps=3")), "--out", str(out)]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and err.startswith("error: training diverged: 3 steps in a row up to step 5"), err
    assert "max_nonfinite_steps=3" in err and "Traceback" not in err
    # The checkpoint at step 4 (two skipped updates) holds finite weights; nothing after the stop.
    assert run_dir.read_latest(out) == "step-000004" and _optimizer_steps(out / "step-000004") == 2
    assert not (out / "step-000006").exists()


def test_nonfinite_weights_are_never_checkpointed(make_config, tmp_path, monkeypatch):
    real = loop.train_step

    def overflowing_step(model, optimizer, *args, **kwargs):
        result = real(model, optimizer, *args, **kwargs)
        if optimizer.state and next(iter(optimizer.state.values()))["step"] == 3:
            with torch.no_grad():  # finite gradients, but an update that overflowed
                next(model.parameters())[0, 0] = float("inf")
        return result

    monkeypatch.setattr(loop, "train_step", overflowing_step)
    out = tmp_path / "out"
    with pytest.raises(
        DivergedError,
        match=r"step 4: parameter .* is not finite; no checkpoint written, latest "
        r"still names step-000002",
    ):
        run(prepare(make_config("max_steps=6", "checkpoint_every=2")), out)
    assert run_dir.read_latest(out) == "step-000002" and not (out / "step-000004").exists()
    assert not list(out.glob(".step-*"))


def test_each_checkpoint_records_its_validation_loss(make_config, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(
        "max_steps=4", "checkpoint_every=2", "keep_last=5", "eval_every=4", "eval_steps=2", "data.val_fraction=0.2"
    )
    run(prepare(cfg), out)
    logged = {r["step"]: r["val_loss"] for r in read_metrics(out / METRICS_FILE) if "val_loss" in r}
    assert list(logged) == [4]
    for step in (2, 4):  # step 2: evaluated for the checkpoint; step 4: the scheduled evaluation, reused
        ckpt = out / run_dir.step_dir_name(step)
        state = torch.load(ckpt / run_dir.STATE_FILE, weights_only=False)
        assert state["val_loss_step"] == step and math.isfinite(state["val_loss"])
        assert run_dir.recorded_val_loss(ckpt) == state["val_loss"]
    assert run_dir.recorded_val_loss(out / "step-000004") == logged[4]


def test_without_a_validation_split_no_loss_is_recorded(make_config, tmp_path):
    out = tmp_path / "out"
    run(prepare(make_config("max_steps=2", "checkpoint_every=2")), out)
    assert run_dir.recorded_val_loss(out / "step-000002") is None
    state = torch.load(out / "step-000002" / run_dir.STATE_FILE, weights_only=False)
    assert state["val_loss"] is None


def test_a_nonfinite_recorded_loss_reads_back_as_such(tmp_path):
    run_dir.write_summary(tmp_path, {"step": 3, "val_loss": float("nan")})
    assert math.isnan(run_dir.recorded_val_loss(tmp_path))
    run_dir.write_summary(tmp_path, {"step": 3, "val_loss": float("inf")})
    assert run_dir.recorded_val_loss(tmp_path) == math.inf
    (tmp_path / run_dir.SUMMARY_FILE).write_text("{torn")
    assert run_dir.recorded_val_loss(tmp_path) is None
