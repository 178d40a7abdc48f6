"""SIGTERM stops training at a step boundary with a checkpoint: stopping a job loses no step."""

import os
import signal
import subprocess
import sys
import time

from model.run_dir import read_latest
from trainer.loop import prepare, run
from trainer.progress import METRICS_FILE, read_metrics

from .conftest import REPO


def test_sigterm_checkpoints_the_current_step_and_resume_is_exact(config_file, make_config, tmp_path, losses):
    # Enough steps that the signal (sent once 3 are logged) lands well before the end on a fast machine; the resume
    # and the uninterrupted reference then train the rest in this process, which is most of the test's time.
    steps = 24
    overrides = [f"max_steps={steps}", "checkpoint_every=1000", "log_every=1"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trainer", "--config", str(config_file(*overrides)), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / METRICS_FILE).is_file() or len(read_metrics(out / METRICS_FILE)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the trainer did not start training"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stderr = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    stopped_at = int(read_latest(out).removeprefix("step-"))
    assert 3 <= stopped_at < steps  # a checkpoint no checkpoint_every would have written
    assert max(losses(out)) == stopped_at  # every step that ran is in the checkpoint

    # The rerun resumes there and its losses equal an uninterrupted run's.
    job = make_config(*overrides)
    run(prepare(job), out)
    reference = tmp_path / "reference"
    run(prepare(job), reference)
    assert losses(out) == losses(reference)
    assert read_latest(out) == f"step-{steps:06d}"
