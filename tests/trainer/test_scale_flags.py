"""The training flags for scale (`activation_checkpointing`, `loss_chunk_tokens`, `compile`) change how a step is
computed, not what it computes: the same losses as without them, on text and on chat data; `tensorboard` writes
event files or stops with a clear error."""

from __future__ import annotations

import importlib.util
import json

import pytest

from model.checkpoint import load_model
from trainer.config import ConfigError
from trainer.loop import prepare, run
from trainer.progress import read_metrics


def _losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _run(cfg, out) -> list[float]:
    run(prepare(cfg), out)
    return _losses(out)


@pytest.fixture
def chat_overrides(tmp_path, token_cache) -> list[str]:
    path = tmp_path / "chat.jsonl"
    with path.open("w") as f:
        for i in range(12):
            messages = [{"role": "user", "content": f"Count to {i}."}, {"role": "assistant", "content": f"{i} {i}"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return ["data.format=chat", f"data.sources=['{path}']", "data.seq_len=48", f"data.cache_dir={token_cache}"]


@pytest.mark.parametrize(
    "flags",
    [
        ["activation_checkpointing=true"],
        ["loss_chunk_tokens=24"],
        ["loss_chunk_tokens=7", "activation_checkpointing=true"],
    ],
    ids=["activation_checkpointing", "loss_chunk_tokens", "both"],
)
@pytest.mark.parametrize("kind", ["text", "chat"])
def test_flags_give_the_same_losses(make_config, tmp_path, chat_overrides, flags, kind):
    data = chat_overrides if kind == "chat" else []
    common = [*data, "max_steps=4", "checkpoint_every=4", "grad_accum=2"]
    reference = _run(make_config(*common), tmp_path / "plain")
    flagged = _run(make_config(*common, *flags), tmp_path / "flagged")
    assert flagged == pytest.approx(reference, rel=1e-4, abs=1e-5)
    # The checkpoint is the plain model's: same keys, loadable without the flags.
    a = load_model(tmp_path / "plain" / "step-000004").state_dict()
    b = load_model(tmp_path / "flagged" / "step-000004").state_dict()
    assert a.keys() == b.keys()


def test_a_chunked_loss_run_still_evaluates_and_samples_with_logits(make_config, tmp_path, chat_overrides):
    chat_file = chat_overrides[1].split("'")[1]
    cfg = make_config(
        *chat_overrides,
        "loss_chunk_tokens=16",
        "max_steps=2",
        "checkpoint_every=2",
        "eval_every=2",
        f"data.val_sources=['{chat_file}']",
        "sample_every=2",
        "sample_prompts=['Count to 3.']",
        "sample_tokens=3",
    )
    out = tmp_path / "out"
    run(prepare(cfg), out)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2]
    assert all(r["val_loss"] > 0 for r in records if "val_loss" in r)
    assert [r["step"] for r in records if "samples" in r] == [0, 2]


@pytest.mark.slow
def test_compile_gives_the_same_losses(make_config, tmp_path):
    common = ["max_steps=3", "checkpoint_every=3"]
    reference = _run(make_config(*common), tmp_path / "plain")
    compiled = _run(make_config(*common, "compile=true"), tmp_path / "compiled")
    assert compiled == pytest.approx(reference, rel=1e-3, abs=1e-4)
    state = load_model(tmp_path / "compiled" / "step-000003").state_dict()
    assert not any("_orig_mod" in k for k in state)


def test_tensorboard_without_the_package_is_a_config_error(make_config, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tensorboard.*pip install tensorboard"):
        make_config("tensorboard=true")


def test_tensorboard_writes_the_logged_scalars(make_config, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    run(
        prepare(
            make_config(
                "tensorboard=true",
                "max_steps=3",
                "checkpoint_every=3",
                "data.val_fraction=0.2",
                "eval_every=3",
                "eval_steps=1",
            )
        ),
        out,
    )
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx(_losses(out), rel=1e-6)
    assert [e.step for e in events.Scalars("val/loss")] == [3]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(events.Tags()["scalars"])
