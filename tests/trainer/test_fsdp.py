"""`parallel: fsdp`: FSDP2 over 2 CPU processes (gloo) matches one process, each checkpoint holds every rank's shards
(DCP, `step-*/sharded/`) next to a plain Hugging Face directory the server and `transformers` load, and a resume
from the shards continues exactly."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import WEIGHTS_FILE, CheckpointError, load_model
from model.run_dir import STATE_FILE, SUMMARY_FILE, read_latest, recorded_val_loss
from trainer.checkpointing import PAUSE_ENV, SHARDED_DIR
from trainer.config import ConfigError
from trainer.loop import fsdp_param_dtype, prepare, run
from trainer.progress import METRICS_FILE, read_metrics
from trainer.sharded_checkpoint import export_hf_from_sharded, is_complete_sharded

from .test_ddp import REPO, torchrun_trainer

CPU = torch.device("cpu")


def test_parallel_accepts_ddp_or_fsdp_and_names_the_key(make_config):
    assert make_config().parallel == "ddp"
    assert make_config("parallel=fsdp").parallel == "fsdp"
    with pytest.raises(ConfigError, match=r"^parallel: .*'ddp' or 'fsdp' \(got 'zero3'\)"):
        make_config("parallel=zero3")


def test_fsdp_gathers_parameters_in_bf16_only_when_computing_in_bf16(make_config):
    assert fsdp_param_dtype(make_config("parallel=fsdp", "dtype=bfloat16"), CPU) == torch.bfloat16
    assert fsdp_param_dtype(make_config("parallel=fsdp", "dtype=float32"), CPU) is None


@pytest.mark.parametrize(("dtype", "gathered"), [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_parallelize_shards_with_bf16_gathers_when_computing_in_bf16(make_config, tmp_path, dtype, gathered):
    """`parallelize` under torchrun (a one-rank gloo group here, told it is one of two): the blocks and the root are
    FSDP units whose weights are gathered in the compute dtype, while the sharded masters stay fp32."""
    import torch.distributed as dist

    from model.config import ModelConfig
    from model.llama import Transformer
    from trainer.distributed import DistInfo
    from trainer.loop import parallelize
    from trainer.parallel import is_fsdp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = Transformer(ModelConfig.from_name("tiny"))
        parallelize(model, make_config("parallel=fsdp", f"dtype={dtype}"), DistInfo(0, 2, 0, CPU))
        assert is_fsdp(model) and all(is_fsdp(block) for block in model.layers)
        assert model.norm.weight.dtype == torch.float32 and type(model.norm.weight).__name__ == "DTensor"
        with torch.no_grad():
            model(torch.arange(8).unsqueeze(0))
        assert model.norm.weight.dtype == gathered  # the root stays gathered after its forward
    finally:
        dist.destroy_process_group()


def test_a_failed_shard_write_leaves_the_previous_checkpoint_latest(make_config, tmp_path, monkeypatch):
    from trainer.checkpointing import CheckpointWriteError

    out = tmp_path / "out"
    run(prepare(make_config("max_steps=2", "checkpoint_every=2", "parallel=fsdp")), out)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("torch.distributed.checkpoint.save", disk_full)  # what save_sharded calls
    with pytest.raises(CheckpointWriteError, match=r"step-000004: .*No space.*step-000002 is intact"):
        run(prepare(make_config("max_steps=4", "checkpoint_every=2", "parallel=fsdp")), out)
    assert read_latest(out) == "step-000002"
    assert sorted(p.name for p in out.iterdir() if "step-" in p.name) == ["step-000002"]  # no hidden debris


def _val_losses(out):
    return {r["step"]: r["val_loss"] for r in read_metrics(out / METRICS_FILE) if r.get("val_loss") is not None}


def test_one_process_writes_the_sharded_layout_and_resumes_from_it(make_config, tmp_path, losses):
    """With one process nothing is wrapped (the losses are the plain run's, exactly), but the checkpoints have the
    fsdp layout; the other mode refuses to resume them instead of starting over."""
    overrides = ["max_steps=4", "checkpoint_every=2", "keep_last=1"]
    plain = tmp_path / "plain"
    run(prepare(make_config(*overrides)), plain)
    out = tmp_path / "fsdp"
    job = make_config(*overrides, "parallel=fsdp", "keep_last=2")
    run(prepare(job), out)
    assert losses(out) == losses(plain)

    step4 = out / "step-000004"
    assert is_complete_sharded(step4 / SHARDED_DIR) and not (step4 / STATE_FILE).exists()
    assert (step4 / SUMMARY_FILE).is_file() and (step4 / "tokenizer.json").is_file()
    a, b = load_file(step4 / WEIGHTS_FILE), load_file(plain / "step-000004" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Step 4's shards lost their DCP metadata: the resume skips it for step 2 and rewrites step 4 exactly.
    expected = losses(out)
    (step4 / SHARDED_DIR / ".metadata").unlink()
    assert run(prepare(job), out).start_step == 2
    assert losses(out) == expected
    assert is_complete_sharded(step4 / SHARDED_DIR)

    with pytest.raises(CheckpointError, match="written with parallel: fsdp, this run has parallel: ddp"):
        run(prepare(make_config(*overrides, "max_steps=6")), out)
    with pytest.raises(CheckpointError, match="written with parallel: ddp, this run has parallel: fsdp"):
        run(prepare(make_config(*overrides, "max_steps=6", "parallel=fsdp")), plain)
    assert read_latest(plain) == "step-000004" and read_latest(out) == "step-000004"  # nothing overwritten
    # Retention as with ddp: keep_last checkpoints, the one `latest` names among them.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step-")) == ["step-000002", "step-000004"]
    assert sorted(p.name for p in plain.iterdir() if p.name.startswith("step-")) == ["step-000004"]


@pytest.mark.long
def test_two_processes_match_one_resume_exactly_and_export_for_the_server(config_file, make_config, tmp_path, losses):
    from transformers import AutoModelForCausalLM

    from service.loading import make_loader
    from tests.service.conftest import tiny_settings

    # The chunked loss and the validation pass read the gathered output weight after the forward; samples
    # gather the whole model onto rank 0.
    overrides = ["max_steps=4", "checkpoint_every=2", "batch_size=4", "grad_accum=2", "loss_chunk_tokens=16"]
    overrides += ["data.val_fraction=0.2", "eval_every=2", "eval_steps=2", "sample_every=4", "sample_tokens=4"]
    single = tmp_path / "single"  # one process: nothing wrapped, the sharded checkpoint layout
    run(prepare(make_config(*overrides, "parallel=fsdp")), single)

    out = tmp_path / "fsdp"
    config = config_file(*overrides, "parallel=fsdp")
    torchrun_trainer(config, out)
    expected, got = losses(single), losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step in expected:
        assert abs(got[step] - expected[step]) < 1e-4, (step, got[step], expected[step])
    val_expected, val_got = _val_losses(single), _val_losses(out)
    assert sorted(val_got) == [2, 4]
    for step in val_expected:
        assert abs(val_got[step] - val_expected[step]) < 1e-4, (step, val_got[step], val_expected[step])
    assert any("samples" in r for r in read_metrics(out / METRICS_FILE))

    # Every rank wrote its shards and its own data position and RNG; rank 0 the Hugging Face files.
    step4 = out / "step-000004"
    assert read_latest(out) == "step-000004"
    shards = sorted(p.name for p in (step4 / SHARDED_DIR).iterdir())
    assert {"__0_0.distcp", "__1_0.distcp", "rank-00000.pt", "rank-00001.pt"} <= set(shards)
    assert not [p for p in out.iterdir() if p.name.startswith(".step-")]
    assert recorded_val_loss(step4) == pytest.approx(val_got[4], abs=1e-6)

    # The Hugging Face weights: the training shards gathered, and the single process's within tolerance.
    hf = load_file(step4 / WEIGHTS_FILE)
    offline = load_file(export_hf_from_sharded(step4 / SHARDED_DIR, tmp_path / "offline") / WEIGHTS_FILE)
    reference = load_file(single / "step-000004" / WEIGHTS_FILE)
    assert hf.keys() == offline.keys() == reference.keys()
    for name in hf:
        assert torch.equal(hf[name], offline[name]), name
        # The two ranks' gradient sums round in another order than one process's. Adam divides each update by
        # sqrt(v), so where a gradient element is near zero that rounding can move its weight by a good part of a
        # step (lr 3e-3): with torch kept to AVX2 on an AVX-512 CPU, 1 of o_proj's 4096 weights was 1.07e-4 off, the
        # rest within 4.4e-5. So: almost every weight within (1e-4 + 1e-3 |w|), and none off by a third of a step. A
        # shard gathered wrong or a gradient left unreduced moves most weights by far more.
        diff = (hf[name] - reference[name]).abs()
        outside = (diff > 1e-4 + 1e-3 * reference[name].abs()).sum().item()
        assert outside <= max(1, diff.numel() // 1000) and diff.max().item() < 1e-3, (name, outside, diff.max())

    # It loads in transformers and in the server's loader, with the same logits.
    x = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(step4, torch_dtype=torch.float32).eval()(x).logits
        ours = load_model(step4)(x)
        served, _ = make_loader(tiny_settings(step4, pack_weights=False))(step4)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(served(x), ours, rtol=1e-4, atol=1e-4)

    # kill -9 of every process while rank 0 holds the checkpoint of step 4 complete but hidden (all shards
    # written): the rerun clears it, resumes from the shards of step 2 in fresh processes, and gives the
    # uninterrupted run's losses, exactly.
    killed = tmp_path / "killed"
    _kill_during_the_write_of_step_4(config, killed)
    assert read_latest(killed) == "step-000002" and not (killed / "step-000004").exists()
    assert "resuming from" in torchrun_trainer(config, killed).stderr
    assert losses(killed) == got
    assert _val_losses(killed) == val_got
    assert not [p for p in killed.iterdir() if p.name.startswith(".step-")]

    # The one process's checkpoint of step 2, resumed by 2 processes: its shards redistributed, rank 1 taking
    # rank 0's data position; the one process's losses within tolerance.
    grown = tmp_path / "grown"
    grown.mkdir()
    shutil.copytree(single / "step-000002", grown / "step-000002")
    (grown / "latest").write_text("step-000002\n")
    torchrun_trainer(config, grown)
    for step in (3, 4):
        assert abs(losses(grown)[step] - expected[step]) < 1e-4, (step, losses(grown)[step], expected[step])


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own: no process group reaches
    them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_during_the_write_of_step_4(config, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "trainer"]
    cmd += ["--config", str(config), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_ENV: "4:120"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob(".step-000004.tmp-*/sharded/.metadata")) or not list(
            out.glob(".step-000004.tmp-*/trainer_summary.json")
        ):
            assert proc.poll() is None and time.monotonic() < deadline, "the job never reached the write of step 4"
            time.sleep(0.1)
        workers = _descendants(proc.pid)
        assert len(workers) >= 2, workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
