"""The trainer output directory's layout, as the trainer writes it and the server reads it."""

import subprocess
import sys
from pathlib import Path

import pytest

from model import run_dir
from model.checkpoint import save_checkpoint
from service.checkpoints import newest_checkpoint, step_of
from trainer.checkpointing import remove_debris


def test_names_round_trip():
    assert run_dir.step_dir_name(123) == "step-000123"
    assert run_dir.parse_step("step-000123") == 123
    assert run_dir.parse_step("step-1234567") == 1234567
    for name in (".step-000123.tmp-abc", "step-", "step-12a", "latest", "step-000001/x"):
        assert run_dir.parse_step(name) is None
    assert step_of(Path("/x/step-000042")) == "42" and step_of(Path("/x/final")) == ""


def test_latest_is_written_atomically_and_read_defensively(tmp_path):
    assert run_dir.read_latest(tmp_path) is None
    run_dir.write_latest(tmp_path, "step-000004")
    assert (tmp_path / run_dir.LATEST_FILE).read_text() == "step-000004\n"
    assert run_dir.read_latest(tmp_path) == "step-000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no temporary left behind
    for bad in ("../elsewhere", ".step-000004.tmp-1", ""):
        (tmp_path / "latest").write_text(bad + "\n")
        assert run_dir.read_latest(tmp_path) is None
    with pytest.raises(ValueError, match="step-"):
        run_dir.write_latest(tmp_path, "../elsewhere")


def test_a_failed_latest_write_leaves_the_old_one_and_no_temporary(tmp_path, monkeypatch):
    run_dir.write_latest(tmp_path, "step-000002")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_dir.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        run_dir.write_latest(tmp_path, "step-000004")
    assert run_dir.read_latest(tmp_path) == "step-000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_newest_complete_prefers_latest_then_the_highest_complete(tmp_path, tiny_model):
    assert run_dir.newest_complete(tmp_path / "missing") is None
    assert run_dir.newest_complete(tmp_path) is None
    for step in (1, 2):
        save_checkpoint(tmp_path / run_dir.step_dir_name(step), tiny_model)
    (tmp_path / "step-000003").mkdir()  # incomplete: a directory without files
    (tmp_path / ".step-000009.tmp-x").mkdir()  # an in-flight write
    assert [s for s, _ in run_dir.checkpoint_dirs(tmp_path)] == [3, 2, 1]
    assert run_dir.newest_complete(tmp_path) == tmp_path / "step-000002"
    run_dir.write_latest(tmp_path, "step-000001")
    assert run_dir.newest_complete(tmp_path) == tmp_path / "step-000001"
    run_dir.write_latest(tmp_path, "step-000007")  # names a deleted checkpoint
    assert newest_checkpoint(tmp_path) == tmp_path / "step-000002"


def test_remove_debris_clears_interrupted_writes_only(tmp_path):
    (tmp_path / ".step-000009.tmp-x").mkdir()
    (tmp_path / ".latest.tmp-123").write_text("step-000009\n")
    (tmp_path / "step-000001").mkdir()
    remove_debris(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]


def test_bundled_and_convert_do_not_import_each_other():
    code = (
        "import sys, model.bundled; assert 'model.convert' not in sys.modules, 'bundled imports convert'; "
        "import model.convert"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
