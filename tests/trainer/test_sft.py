"""Supervised fine-tuning through the trainer (`data.format: chat`) on the tiny model: it learns, resumes exactly,
trains on assistant tokens only, and records the before/after figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.llama import Transformer
from model.run_dir import LATEST_FILE
from trainer.chat_data import IGNORE_INDEX
from trainer.config import ConfigError
from trainer.loop import prepare, run, train_step
from trainer.progress import read_metrics

_NUMBERS = "zero one two three four five six seven eight nine".split()


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> tuple[Path, Path]:
    """A small, repetitive question/answer set (easy to fit) and a held-out file of the same kind."""
    root = tmp_path_factory.mktemp("chat")

    def write(name: str, numbers: range) -> Path:
        path = root / name
        with path.open("w") as f:
            for i in numbers:
                messages = [
                    {"role": "user", "content": f"Spell {i % 10}."},
                    {"role": "assistant", "content": f"{_NUMBERS[i % 10]} {_NUMBERS[i % 10]}"},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
        return path

    return write("train.jsonl", range(40)), write("heldout.jsonl", range(3, 9))


@pytest.fixture
def chat_config(make_config, chat_files, token_cache):
    train_file, heldout_file = chat_files

    def make(*overrides: str):
        return make_config(
            "data.format=chat",
            f"data.sources=['{train_file}']",
            f"data.val_sources=['{heldout_file}']",
            "data.seq_len=64",
            f"data.cache_dir={token_cache}",
            "optim.lr=1e-2",
            *overrides,
        )

    return make


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def test_a_chat_run_learns_and_records_the_before_and_after(chat_config, tmp_path):
    out = tmp_path / "out"
    cfg = chat_config(
        "max_steps=12",
        "checkpoint_every=12",
        "eval_every=12",
        "eval_steps=2",
        "sample_every=12",
        "sample_prompts=['Spell 4.']",
        "sample_tokens=4",
    )
    run(prepare(cfg), out)
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 13)) and all(map(torch.isfinite, torch.tensor(list(losses.values()))))
    assert losses[12] < 0.6 * losses[1], losses
    records = read_metrics(out / "metrics.jsonl")
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(val) == [0, 12] and val[12] < val[0]  # before any update, and after
    samples = [r for r in records if "samples" in r]
    assert [r["step"] for r in samples] == [0, 12] and samples[0]["samples"][0]["prompt"] == "Spell 4."


def test_resume_from_a_chat_checkpoint_is_exact(chat_config, tmp_path):
    cfg = chat_config("max_steps=6", "checkpoint_every=2", "keep_last=10", "grad_accum=2")
    full = tmp_path / "full"
    run(prepare(cfg), full)
    reference = _losses(full)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "step-000006")
    (resumed / LATEST_FILE).write_text("step-000004\n")
    summary = run(prepare(cfg), resumed)
    assert summary.start_step == 4
    assert _losses(resumed) == reference  # float equality


class _Batches:
    def __init__(self, *batches):
        self.batches = iter(batches)

    def next_batch(self):
        return next(self.batches)


def test_the_loss_is_the_mean_over_the_labelled_tokens_only():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny"))
    x = torch.randint(0, 1000, (2, 16))
    positions = torch.arange(16).repeat(2, 1)
    y = torch.full((2, 16), IGNORE_INDEX)
    y[1, 5] = 42
    expected = F.cross_entropy(model(x, positions=positions)[1, 5], torch.tensor(42))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, _ = train_step(
        model, optimizer, _Batches((x, y, positions)), 1, 0.0, torch.device("cpu"), torch.autocast("cpu", enabled=False)
    )
    torch.testing.assert_close(loss, expected)
    # Two micro-batches: the mean over both steps' labelled tokens (2 here), not the mean of per-batch means.
    y2 = y.clone()
    y2[0, 3] = 7
    both = (
        F.cross_entropy(model(x, positions=positions)[[1, 0, 1], [5, 3, 5]], torch.tensor([42, 7, 42]), reduction="sum")
        / 3
    )
    loss, _ = train_step(
        model,
        optimizer,
        _Batches((x, y, positions), (x, y2, positions)),
        2,
        0.0,
        torch.device("cpu"),
        torch.autocast("cpu", enabled=False),
    )
    torch.testing.assert_close(loss, both)


def test_chat_only_fields_are_checked(make_config, chat_config):
    with pytest.raises(ConfigError, match="val_sources is for format: chat"):
        make_config("data.val_sources=['held.jsonl']")
    with pytest.raises(ConfigError, match="`stdlib` is raw text"):
        make_config("data.format=chat", "data.sources=['stdlib']")
    assert chat_config().data.format == "chat"
