"""The command line: bad input stops the job with exit code 2 and one `error:` line before training starts;
a `kill -9` in the middle of a checkpoint write loses nothing but the steps since the last checkpoint."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.run_dir import STATE_FILE, read_latest
from trainer.__main__ import main
from trainer.checkpointing import PAUSE_ENV
from trainer.loop import prepare, run
from trainer.out_lock import OutputLock

REPO = Path(__file__).resolve().parents[2]


def _error_of(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.sources=[{tmp}/missing.txt]"], r"error: data\.sources: .*missing\.txt: no such file"),
        (["data.sources=[{tmp}/empty]"], r"error: data\.sources .*empty"),
        (["data.seq_len=1024"], r"error: data\.seq_len=1024 exceeds the model's block size 256"),
        (["init_from={tmp}/no-checkpoint"], r"error: init_from: .*no-checkpoint: no such checkpoint directory"),
        (["optim.warmup=3"], r"error: optim\.warmup: unknown key"),
        (["batch_size=0"], r"error: batch_size: "),
    ],
    ids=["missing-file", "empty-corpus", "seq-len", "missing-init", "unknown-key", "bad-value"],
)
def test_bad_input_exits_2_before_training(config_file, tmp_path, capsys, overrides, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n\n")
    out = tmp_path / "out"
    rc, err = _error_of(
        capsys, ["--config", str(config_file()), "--out", str(out), *[o.format(tmp=tmp_path) for o in overrides]]
    )
    assert rc == 2
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not out.exists()  # nothing was started


def test_cli_process_reports_one_line(run_cli, config_file, tmp_path):
    res = run_cli(["--config", str(config_file()), "--out", str(tmp_path / "out"), "data.seq_len=300"], timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == ["error: data.seq_len=300 exceeds the model's block size 256"]


def test_kill_9_mid_checkpoint_write_then_resume(config_file, make_config, tmp_path, losses, capsys):
    overrides = ["max_steps=8", "checkpoint_every=2", "keep_last=5"]
    reference_dir = tmp_path / "reference"
    run(prepare(make_config(*overrides)), reference_dir)
    reference = losses(reference_dir)

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trainer", "--config", str(config_file(*overrides)), "--out", str(out)]
    env = {**os.environ, PAUSE_ENV: "4:120"}  # sleep inside the write of step 4, after its trainer state
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".step-000004.tmp-*/" + STATE_FILE)):
            assert proc.poll() is None, "the trainer exited before the checkpoint write"
            assert time.monotonic() < deadline, "the checkpoint write never started"
            time.sleep(0.1)
        # A second trainer on the same OUT meanwhile fails at once, naming the holder.
        rc, err = _error_of(capsys, ["--config", str(config_file(*overrides)), "--out", str(out)])
        assert (
            rc == 2
            and err
            == f"error: {out} is locked by another trainer (pid {proc.pid}); use another "
            "--out, or wait for that one to end"
        ), err
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Only complete checkpoints are visible; `latest` names one; the half-written one is hidden debris.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.is_dir()) == ["step-000002"]
    assert read_latest(out) == "step-000002"
    assert (out / "step-000002" / STATE_FILE).is_file()
    assert list(out.glob(".step-000004.tmp-*"))

    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr and "step-000002" in res.stderr
    assert losses(out) == reference  # bit-exact, including the steps the killed run had already logged
    assert read_latest(out) == "step-000008"
    assert not [p for p in out.iterdir() if p.name.startswith(".step-")]


def test_a_second_trainer_on_a_locked_out_fails_at_once(config_file, make_config, tmp_path, capsys):
    out = tmp_path / "out"
    with OutputLock(out):
        rc, err = _error_of(capsys, ["--config", str(config_file()), "--out", str(out)])
        assert rc == 2 and err.startswith(f"error: {out} is locked by another trainer (pid {os.getpid()})"), err
        assert not (out / "metrics.jsonl").exists() and not list(out.glob("step-*"))
    # Released (as the kernel does when the holder exits): the job runs.
    summary = run(prepare(make_config("max_steps=2", "checkpoint_every=2")), out)
    assert summary.final_step == 2 and read_latest(out) == "step-000002"
