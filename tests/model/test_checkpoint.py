import json
import threading

import pytest
import torch

from model.checkpoint import CheckpointError, is_complete_checkpoint, load_model, save_checkpoint


def test_save_load_round_trip(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "ckpt", tiny_model)
    loaded = load_model(path)
    idx = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx), tiny_model(idx))
    assert loaded.output.weight is loaded.tok_embeddings.weight  # tying survives the round trip


def test_bf16_load(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.rope_cos.dtype == torch.float32


def test_saving_is_atomic_for_a_polling_reader(tmp_path, tiny_model, tokenizer):
    """A reader that polls for checkpoints sees nothing or a complete one; never a partial one."""
    targets = [tmp_path / f"step-{i:06d}" for i in range(1, 4)]
    seen: list[set[str]] = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            for target in targets:
                try:
                    seen.append({p.name for p in target.iterdir()})
                except FileNotFoundError:  # not there yet
                    pass

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for target in targets:
            save_checkpoint(target, tiny_model, tokenizer=tokenizer)
    finally:
        done.set()
        reader.join()
    full = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert seen and all(full <= names for names in seen)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_replacing_a_checkpoint(tmp_path, tiny_model):
    target = save_checkpoint(tmp_path / "ckpt", tiny_model)
    (target / "stale.txt").write_text("from the old version")
    save_checkpoint(target, tiny_model)
    assert not (target / "stale.txt").exists() and load_model(target) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_write_leaves_nothing(tmp_path, tiny_model):
    def boom(_):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", tiny_model, extra=boom)
    assert list(tmp_path.iterdir()) == []


def test_missing_files_named(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "ckpt", tiny_model)
    (path / "model.safetensors").unlink()
    assert not is_complete_checkpoint(path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_model(tmp_path / "nope")


def test_truncated_safetensors_named(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "ckpt", tiny_model)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_model(path)


def test_a_loaded_model_survives_its_file_being_overwritten_in_place(tmp_path, tiny_model):
    """`cp` onto a served checkpoint truncates and rewrites the same file. A model whose weights stayed mapped from it
    (safetensors' load_file mmaps; fp32 weights in an fp32 model are not copied) would die of SIGBUS at its next
    step: run in a child process, so that such a death is a failure here and not the end of the test run."""
    import subprocess
    import sys
    from pathlib import Path

    path = save_checkpoint(tmp_path / "ckpt", tiny_model)
    code = (
        "import os, sys, torch\n"
        "from model.checkpoint import load_model\n"
        "model = load_model(sys.argv[1])\n"
        "with torch.inference_mode():\n"
        "    before = model(torch.tensor([[1, 2, 3]]))\n"
        "    os.truncate(os.path.join(sys.argv[1], 'model.safetensors'), 64)\n"
        "    assert torch.equal(model(torch.tensor([[1, 2, 3]])), before)\n"
        "print('ok')\n"
    )
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", code, str(path)], cwd=repo, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


def test_wrong_shapes_named(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "ckpt", tiny_model)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*mlp\.gate_proj\.weight has shape"):
        load_model(path)


def test_invalid_config_named(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "ckpt", tiny_model)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(path)
