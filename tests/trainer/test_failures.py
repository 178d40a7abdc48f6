"""Edge cases of multi-process and failing runs end in a decision or a one-line error, never a hang or a
traceback: rank 0 decides what to resume, one rank converts the embedded model, a resume on fewer GPUs, a
missing GPU, and a `latest` or retention failure after a checkpoint write."""

import logging
import random
import threading
import time

import numpy as np
import pytest
import torch

from model import run_dir
from model.checkpoint import CheckpointError, save_checkpoint
from model.config import ModelConfig
from model.llama import Transformer
from trainer import checkpointing, init_source
from trainer.__main__ import main
from trainer.distributed import DistInfo
from trainer.loop import prepare, run
from trainer.state import resume_point

CPU = torch.device("cpu")


def _error_of(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def test_other_ranks_resume_from_the_checkpoint_rank_0_chose(make_config, tmp_path):
    out = tmp_path / "out"
    run(prepare(make_config("max_steps=4", "checkpoint_every=2", "keep_last=5")), out)
    told = []

    def from_rank_0(obj, info):
        told.append(obj)
        return "step-000002"  # what rank 0 decided, although this rank sees a newer one

    rank1 = DistInfo(rank=1, world_size=2, local_rank=1, device=CPU)
    path, _, saved = resume_point(out, rank1, from_rank_0)
    assert path == out / "step-000002" and saved["step"] == 2 and told == [None]  # rank 1 looked at nothing

    rank0 = DistInfo(rank=0, world_size=2, local_rank=0, device=CPU)
    path, _, _ = resume_point(out, rank0, lambda obj, info: told.append(obj) or obj)
    assert path == out / "step-000004" and told[-1] == "step-000004"

    # A rank that cannot read rank 0's choice stops with the reason instead of resuming elsewhere.
    weights = out / "step-000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="step-000002"):
        resume_point(out, rank1, from_rank_0)


def test_only_rank_0_converts_the_embedded_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def no_conversion(*args, **kwargs):
        raise AssertionError("a rank other than 0 converted the embedded model")

    monkeypatch.setattr(init_source.bundled, "default_checkpoint", no_conversion)
    target = init_source.bundled.default_checkpoint_dir()
    model = Transformer(ModelConfig.from_name("tiny"))
    model.init_weights(0)
    writer = threading.Timer(1.0, lambda: save_checkpoint(target, model))  # rank 0's conversion, landing later
    writer.start()
    t0 = time.monotonic()
    try:
        assert init_source._bundled() == target
    finally:
        writer.join()
    assert time.monotonic() - t0 >= 0.9  # it waited for rank 0

    monkeypatch.setattr(init_source, "BUNDLED_WAIT_S", 0.5)
    monkeypatch.setenv("SMOLLM_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(init_source.ConfigError, match="rank 0 did not convert it"):
        init_source._bundled()


def test_resume_on_fewer_gpus_restores_the_rng_states_that_match(monkeypatch, caplog):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    gpu0, gpu1 = torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": [gpu0, gpu1],
    }
    with caplog.at_level(logging.WARNING, logger="trainer.checkpointing"):
        checkpointing.restore_rng_state(state)
    assert restored == [(gpu0, 0)]
    assert "2 devices, this node has 1" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_config_error(config_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _error_of(capsys, ["--config", str(config_file("device=cuda")), "--out", str(out)])
    assert (rc, err) == (2, "error: device: cuda requested but no CUDA device is available")
    assert not out.exists()


def test_a_latest_update_failure_ends_in_one_error_line(config_file, tmp_path, capsys, monkeypatch):
    def full_disk(out_dir, name):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing, "write_latest", full_disk)
    out = tmp_path / "out"
    rc, err = _error_of(capsys, ["--config", str(config_file("max_steps=2", "checkpoint_every=2")), "--out", str(out)])
    assert rc == 1 and err.startswith(f"error: wrote checkpoint {out / 'step-000002'} but could not update"), err
    assert "No space left on device" in err and "it still names nothing" in err


def test_a_retention_failure_ends_in_one_error_line(config_file, tmp_path, capsys, monkeypatch):
    real_rename = checkpointing.os.rename

    def rename(src, dst):
        if ".del-" in str(dst):
            raise PermissionError(13, "Permission denied", str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(checkpointing.os, "rename", rename)
    out = tmp_path / "out"
    rc, err = _error_of(
        capsys, ["--config", str(config_file("max_steps=4", "checkpoint_every=2", "keep_last=1")), "--out", str(out)]
    )
    assert rc == 1 and "could not delete older ones (keep_last=1)" in err and "Permission denied" in err, err
    assert run_dir.read_latest(out) == "step-000004"
