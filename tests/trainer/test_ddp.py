"""DistributedDataParallel over 2 CPU processes (gloo) matches one process with the same global batch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model.run_dir import read_latest
from trainer.loop import prepare, run

REPO = Path(__file__).resolve().parents[2]


def torchrun_trainer(config: Path, out: Path) -> subprocess.CompletedProcess:
    """`python -m trainer` under torchrun with 2 gloo processes (one thread each); fails with their stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "trainer"]
    cmd += ["--config", str(config), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.long
def test_two_processes_match_one_and_resume(config_file, make_config, tmp_path, losses):
    overrides = ["max_steps=4", "checkpoint_every=2", "batch_size=4", "grad_accum=2"]
    single = tmp_path / "single"
    run(prepare(make_config(*overrides)), single)

    ddp = tmp_path / "ddp"
    config = config_file(*overrides)
    torchrun_trainer(config, ddp)

    expected, got = losses(single), losses(ddp)
    assert sorted(got) == [1, 2, 3, 4]
    for step in expected:
        assert abs(got[step] - expected[step]) < 1e-4, (step, got[step], expected[step])
    # Rank 0 alone wrote the checkpoint and the log.
    assert read_latest(ddp) == "step-000004"
    assert len((ddp / "metrics.jsonl").read_text().splitlines()) == 4

    # Resume with the same world size from step 2: the same losses as the uninterrupted DDP run.
    shutil.rmtree(ddp / "step-000004")
    (ddp / "latest").write_text("step-000002\n")
    assert "resuming from" in torchrun_trainer(config, ddp).stderr
    assert losses(ddp) == got


def test_two_processes_match_one_on_chat_data(config_file, make_config, tmp_path, token_cache, losses):
    """The SFT loss is the mean over the step's assistant tokens of all ranks (counted and all-reduced), not a mean
    of per-rank means: conversations of different reply lengths put different counts on each rank."""
    import json

    path = tmp_path / "chat.jsonl"
    with path.open("w") as f:
        for i in range(16):
            reply = " ".join(["word"] * (1 + 5 * (i % 4)))
            f.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": reply}]}
                )
                + "\n"
            )
    overrides = [
        "data.format=chat",
        f"data.sources=['{path}']",
        "data.seq_len=48",
        f"data.cache_dir={token_cache}",
        "max_steps=3",
        "checkpoint_every=3",
        "batch_size=4",
        "grad_accum=2",
    ]
    single = tmp_path / "single"
    run(prepare(make_config(*overrides)), single)
    ddp = tmp_path / "ddp"
    torchrun_trainer(config_file(*overrides), ddp)
    expected, got = losses(single), losses(ddp)
    assert sorted(got) == [1, 2, 3]
    for step in expected:
        assert abs(got[step] - expected[step]) < 1e-4, (step, got[step], expected[step])
