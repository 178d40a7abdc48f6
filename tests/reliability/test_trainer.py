"""Trainer faults: `kill -9` at random instants (during steps, start-up and checkpoint writes) with resume,
bad data, a missing init checkpoint, and a full disk while a checkpoint is written."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from model.checkpoint import is_complete_checkpoint, load_model
from tests.reliability.harness import QUICK_TRAINING, REPO, TINY_YAML, clean_env, trainer_cmd


def run_trainer(
    out: Path, *overrides: str, timeout: float = 120, cmd: list[str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd or trainer_cmd(out, *overrides), cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


def losses(out: Path) -> dict[int, list[float]]:
    """step -> every loss logged for it in OUT/metrics.jsonl (a step re-run after a resume appears again)."""
    found: dict[int, list[float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if "loss" in record:
                found.setdefault(record["step"], []).append(record["loss"])
    return found


def check_out_dir(out: Path) -> list[str]:
    """What is wrong with a trainer output directory right now: `latest` naming a missing or partial
    checkpoint, or a visible step-* directory that does not load."""
    problems = []
    if not out.is_dir():
        return problems
    latest = out / "latest"
    if latest.exists():
        name = latest.read_text().strip()
        if not is_complete_checkpoint(out / name):
            problems.append(f"latest names {name!r}, which is not a complete checkpoint")
    for d in sorted(out.glob("step-*")):
        try:
            load_model(d)
        except Exception as e:  # any failure to load is what this test looks for
            problems.append(f"{d.name} does not load: {e}")
        if not (d / "trainer_state.pt").is_file():
            problems.append(f"{d.name} has no trainer_state.pt")
    return problems


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(FileNotFoundError):
            if condition():
                return True
        time.sleep(0.02)
    return False


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> bool:
    return _wait_for(lambda: text in log.read_text(errors="replace"), proc, timeout)


# (anchor, seconds after it within which the kill lands). On the 2-core CI machine a tiny step with its checkpoint
# takes ~0.85 s: ~0.4 s from the loss line to the write's hidden directory, ~0.2 s of write, then retention.
TRAINING_KILL_ANCHORS = [("loss line", 0.5), ("write started", 0.15), ("checkpoint saved", 0.6)]


def _stratified(rng: random.Random, k: int, n: int, low: float, high: float) -> float:
    """A random instant in the k-th of n equal slices of [low, high)."""
    width = (high - low) / n
    return low + width * (k + rng.random())


@pytest.mark.long
def test_kill_9_at_8_random_instants_then_resume_reproduces_the_losses(tmp_path, figures):
    kills, max_steps = 8, 24
    # Every step writes a checkpoint (about as long as a step here). The instants are stratified (one random
    # instant in each equal slice of a window after an anchor), so that few kills still land in the start-up,
    # before, inside and after checkpoint writes.
    overrides = [f"max_steps={max_steps}", "checkpoint_every=1", "keep_last=2", f"data.cache_dir={tmp_path / 'tokens'}"]
    reference_out, out = tmp_path / "reference", tmp_path / "killed"
    # The uninterrupted run, alongside the killed ones (fp32 on the CPU: the same numbers whatever the load).
    with open(tmp_path / "reference.log", "wb") as ref_log:
        reference = subprocess.Popen(
            trainer_cmd(reference_out, *overrides), cwd=REPO, env=clean_env(), stdout=ref_log, stderr=subprocess.STDOUT
        )
    rng = random.Random(20)
    startup_kills = [i for i in range(kills) if i % 4 == 3]
    training_kills = [i for i in range(kills) if i % 4 != 3]
    start = time.monotonic()
    problems, debris_seen, killed_at = [], 0, []
    try:
        for i in range(kills):
            log = tmp_path / f"life-{i}.log"
            with open(log, "wb") as f:
                proc = subprocess.Popen(
                    trainer_cmd(out, *overrides), cwd=REPO, env=clean_env(), stdout=f, stderr=subprocess.STDOUT
                )
            try:
                if i % 4 == 3:
                    # Some kills during start-up (imports, resume, debris clean-up, tokenizing).
                    where = "start-up"
                    time.sleep(_stratified(rng, startup_kills.index(i), len(startup_kills), 0.3, 3.0))
                else:
                    # Kills anchored on what this life shows, each at a stratified instant after its anchor: the
                    # first loss line (then the checkpoint's preparation or its write), the hidden directory of a
                    # checkpoint write appearing (inside the write), the first saved checkpoint (retention, the next
                    # step or its write; such a life leaves a newer checkpoint, so later lives resume mid-run).
                    k, n = training_kills.index(i), len(TRAINING_KILL_ANCHORS)
                    anchor, window = TRAINING_KILL_ANCHORS[k % n]
                    where = f"training (after {anchor})"
                    _wait_for_line(log, "| loss", proc, timeout=60)
                    if anchor == "write started":
                        _wait_for(lambda: any(out.glob(".step-*.tmp-*")), proc, timeout=60)
                    elif anchor == "checkpoint saved":
                        _wait_for_line(log, "saved checkpoint", proc, timeout=60)
                    same_anchor = len(range(k % n, len(training_kills), n))
                    time.sleep(_stratified(rng, k // n, same_anchor, 0.0, window))
                if proc.poll() is not None:
                    where = "finished before the kill"
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
            killed_at.append(where)
            # Hidden `.step-*` directories left behind show kills that landed inside a checkpoint write.
            debris_seen += sum(1 for p in out.glob(".step-*")) if out.is_dir() else 0
            problems += [f"after kill {i}: {p}" for p in check_out_dir(out)]
        final = run_trainer(out, *overrides, timeout=180)
        ref_code = reference.wait(180)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait(10)
    elapsed = time.monotonic() - start
    ref_losses, got = losses(reference_out), losses(out)
    mismatched = sorted(s for s in ref_losses if got.get(s) != ref_losses[s])
    figures.update(
        kills=kills,
        max_steps=max_steps,
        kill_phases={k: killed_at.count(k) for k in set(killed_at)},
        hidden_debris_seen_after_kills=debris_seen,
        problems=problems[:10],
        lives_resumed=sum("resuming from" in (tmp_path / f"life-{i}.log").read_text() for i in range(kills)),
        final_exit=final.returncode,
        reference_exit=ref_code,
        steps_compared=len(ref_losses),
        steps_mismatched=mismatched[:20],
        checkpoints_left=sorted(p.name for p in out.glob("step-*")),
        latest=(out / "latest").read_text().strip() if (out / "latest").exists() else None,
        seconds=round(elapsed, 1),
    )
    assert problems == []
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resuming from" in final.stderr, final.stderr[-3000:]  # the losses compared below span a resume
    assert ref_code == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert sorted(ref_losses) == list(range(1, max_steps + 1))
    assert sorted(got) == list(range(1, max_steps + 1)), sorted(got)
    # Bit-exact: every loss in metrics.jsonl (written by all the lives) equals the uninterrupted run's.
    assert mismatched == [], {s: (ref_losses[s], got.get(s)) for s in mismatched[:5]}
    assert check_out_dir(out) == []


@pytest.mark.long
def test_kill_9_inside_a_checkpoint_write_leaves_latest_on_the_previous_one(tmp_path, figures):
    # The trainer's test hook pauses inside the write of step 4 (after the trainer state, before the rename).
    out = tmp_path / "out"
    overrides = ["max_steps=6", "checkpoint_every=2"]  # the default token cache: tokenized once per machine
    env = clean_env(TRAINER_PAUSE_IN_CHECKPOINT_WRITE="4:30")
    log = tmp_path / "life.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(trainer_cmd(out, *overrides), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        paused = _wait_for_line(log, "pausing", proc, timeout=90)
        debris = sorted(p.name for p in out.glob(".step-000004*"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    after_kill = {
        "latest": (out / "latest").read_text().strip(),
        "visible": sorted(p.name for p in out.glob("step-*")),
        "problems": check_out_dir(out),
    }
    resumed = run_trainer(out, *overrides)
    figures.update(
        paused_in_write=paused,
        debris_at_kill=debris,
        **after_kill,
        resume_exit=resumed.returncode,
        debris_after_resume=sorted(p.name for p in out.glob(".step-*")),
    )
    assert paused, log.read_text()[-2000:]
    assert debris, "the kill did not land inside the write of step 4"
    assert after_kill["latest"] == "step-000002" and "step-000004" not in after_kill["visible"]
    assert after_kill["problems"] == []
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "step-000002" in resumed.stderr
    assert (out / "latest").read_text().strip() == "step-000006"
    assert not list(out.glob(".step-*"))


# ---------------------------------------------------------------- bad input


def _bad_sources(tmp_path: Path) -> dict[str, str]:
    d = tmp_path / "data"
    d.mkdir()
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \nnot json\n')
    (d / "garbage.parquet").write_bytes(random.Random(0).randbytes(4096))
    (d / "empty.txt").write_text("")
    (d / "empty_dir").mkdir()
    (d / "no_text.jsonl").write_text('{"title": "no text field"}\n')
    return {
        "invalid_jsonl": str(d / "bad.jsonl"),
        "garbage_parquet": str(d / "garbage.parquet"),
        "empty_file": str(d / "empty.txt"),
        "empty_directory": str(d / "empty_dir"),
        "jsonl_without_text_field": str(d / "no_text.jsonl"),
        "missing_file": str(d / "missing.txt"),
    }


BAD_DATA = [
    "invalid_jsonl",
    "garbage_parquet",
    "empty_file",
    "empty_directory",
    "jsonl_without_text_field",
    "missing_file",
]


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_stops_the_job_with_a_clear_error(tmp_path, case, figures, capsys):
    # The trainer's entry point in this process (the command line's arguments, its exit code and stderr): a
    # process start per case would cost ~8 s of imports that test nothing here. An exception escaping main()
    # fails the test as a traceback would; test_missing_init_checkpoint_stops_the_job_before_any_work below runs
    # the same error path as a process.
    from trainer.__main__ import main

    source = _bad_sources(tmp_path)[case]
    out = tmp_path / "out"
    argv = trainer_cmd(out, "max_steps=2", f"data.sources=[{source}]", f"data.cache_dir={tmp_path / 'tokens'}")
    assert argv[1:3] == ["-m", "trainer"]
    code = main(argv[3:])
    stderr = capsys.readouterr().err
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    figures.update(case=case, exit_code=code, error=error_lines[:1], out_dir_created=out.exists())
    assert code != 0
    assert error_lines, stderr[-2000:]
    # The message names the file (or the empty corpus it made).
    assert Path(source).name in error_lines[0] or "empty" in error_lines[0], error_lines[0]
    assert not list(out.glob("step-*")) if out.exists() else True


def test_missing_init_checkpoint_stops_the_job_before_any_work(tmp_path, figures):
    missing = tmp_path / "no-such-checkpoint"
    out = tmp_path / "out"
    r = run_trainer(out, "max_steps=2", f"init_from={missing}")
    error_lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    figures.update(exit_code=r.returncode, error=error_lines[:1], out_dir_created=out.exists())
    assert r.returncode != 0 and error_lines, r.stderr[-2000:]
    assert "init_from" in error_lines[0] and str(missing) in error_lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists() or not list(out.iterdir())


# A wrapper that runs the trainer unchanged except that the second model.safetensors write fails half-way with
# ENOSPC, the way a full disk fails (the first checkpoint is written normally).
FULL_DISK_WRAPPER = """
import errno, runpy, sys
import model.checkpoint as mc
real = mc.save_file
calls = []
def save_file(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) < 2:
        return real(tensors, filename, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(b"\\0" * 4096)
    raise OSError(errno.ENOSPC, "No space left on device", filename)
mc.save_file = save_file
sys.argv = ["trainer"] + sys.argv[1:]
runpy.run_module("trainer", run_name="__main__", alter_sys=True)
"""


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _check_full_disk_outcome(r: subprocess.CompletedProcess, out: Path) -> dict:
    error_lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    outcome = {
        "exit_code": r.returncode,
        "error": error_lines[:1],
        "last_stderr_line": r.stderr.strip().splitlines()[-1:],
        "traceback": "Traceback" in r.stderr,
        "latest": (out / "latest").read_text().strip() if (out / "latest").exists() else None,
        "visible": sorted(p.name for p in out.glob("step-*")),
        "hidden_debris": sorted(p.name for p in out.glob(".step-*")),
        "problems": check_out_dir(out),
    }
    return outcome


def _assert_full_disk_handled(o: dict) -> None:
    assert o["exit_code"] != 0
    # No partial checkpoint: the failed write is not visible, nothing half-written is left, latest intact.
    assert o["visible"] == ["step-000002"] and o["latest"] == "step-000002", o
    assert o["hidden_debris"] == [], o
    assert o["problems"] == [], o
    # A clear error: one `error:` line that says the disk is full (not only a traceback).
    assert o["error"] and any(w in o["error"][0].lower() for w in ("no space", "enospc", "disk full", "full")), o


def test_full_disk_during_a_checkpoint_write_patched_writer(tmp_path, figures):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-c",
        FULL_DISK_WRAPPER,
        "--config",
        str(TINY_YAML),
        "--out",
        str(out),
        *QUICK_TRAINING,
        "max_steps=4",
        "checkpoint_every=2",
        f"data.cache_dir={tmp_path / 'tokens'}",
    ]
    r = run_trainer(out, cmd=cmd)
    o = _check_full_disk_outcome(r, out)
    figures.update(simulation="model.checkpoint.save_file raises ENOSPC half-way through the 2nd checkpoint", **o)
    _assert_full_disk_handled(o)


def test_full_disk_during_a_checkpoint_write_tmpfs(tmp_path, figures):
    disk = tmp_path / "disk"
    # One tiny checkpoint is about 41 MB (weights, tokenizer, optimizer state): 60 MB hold one, not two.
    if not _tmpfs(disk, "60M"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); the patched-writer test covers it")
    try:
        out = disk / "out"
        r = run_trainer(out, "max_steps=4", "checkpoint_every=2", f"data.cache_dir={tmp_path / 'tokens'}")
        o = _check_full_disk_outcome(r, out)
        figures.update(simulation="60 MB tmpfs output directory", **o)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    _assert_full_disk_handled(o)
