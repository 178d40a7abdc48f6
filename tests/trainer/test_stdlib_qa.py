"""The stdlib docstring Q&A dataset: deterministic, valid chat records, no name or answer in both splits."""

from __future__ import annotations

import json
import re

import pytest

from trainer import stdlib_qa
from trainer.chat_data import read_conversations


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("qa")
    counts = stdlib_qa.make_dataset(out)
    return out, counts


def _records(path):
    return [json.loads(line)["messages"] for line in path.read_text().splitlines()]


def test_files_are_valid_chat_records_of_a_sensible_size(dataset):
    out, counts = dataset
    for split in ("train", "heldout"):
        convs = [m for _, m in read_conversations(out / f"{split}.jsonl")]
        assert len(convs) == counts[split]
        for messages in convs:
            assert [m["role"] for m in messages] in (["user", "assistant"], ["user", "assistant"] * 2)
            assert all(m["content"].strip() for m in messages)
    assert 200 < counts["train"] + counts["heldout"] <= 3000
    assert 0.03 < counts["heldout"] / (counts["train"] + counts["heldout"]) < 0.2
    assert any(len(m) == 4 for m in _records(out / "train.jsonl"))  # multi-turn conversations exist


def test_output_is_deterministic(dataset, tmp_path):
    out, counts = dataset
    assert stdlib_qa.make_dataset(tmp_path) == counts
    for split in ("train", "heldout"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (out / f"{split}.jsonl").read_bytes()


def test_no_question_name_or_answer_in_both_splits(dataset):
    out, _ = dataset
    train, held = _records(out / "train.jsonl"), _records(out / "heldout.jsonl")

    def parts(convs, role):
        return {m["content"] for c in convs for m in c if m["role"] == role}

    def names(convs):
        return {n for q in parts(convs, "user") for n in re.findall(r"`([^`]+)`", q)}

    assert not parts(train, "user") & parts(held, "user")
    assert not parts(train, "assistant") & parts(held, "assistant")
    assert not names(train) & names(held)
    assert names(held)


def test_first_paragraph_skips_signatures_and_rejects_what_does_not_fit():
    doc = "dumps(obj, *, indent=None) -> str\n\nSerialize ``obj`` to a JSON\n   formatted ``str``.\n\nMore."
    assert stdlib_qa.first_paragraph(doc) == "Serialize ``obj`` to a JSON formatted ``str``."
    assert stdlib_qa.first_paragraph("Too short.") is None
    assert stdlib_qa.first_paragraph("x" * 600) is None
    assert stdlib_qa.first_paragraph(None) is None


def test_cli_writes_the_files_and_rejects_bad_options(tmp_path, capsys):
    assert stdlib_qa.main(["--out", str(tmp_path / "qa"), "--max-entries", "50"]) == 0
    assert "conversations" in capsys.readouterr().out
    lines = sum(len((tmp_path / "qa" / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "heldout"))
    assert 0 < lines <= 50
    with pytest.raises(SystemExit):
        stdlib_qa.main(["--out", str(tmp_path / "x"), "--heldout-percent", "0"])
    assert "--heldout-percent" in capsys.readouterr().err
