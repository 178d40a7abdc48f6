"""Chat data for SFT: assistant-only labels from the real chat template, packing, the cache, batches, bad input."""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.llama import Transformer
from trainer.chat_data import (
    IGNORE_INDEX,
    ChatBatches,
    ChatDataSpec,
    PackedRows,
    encode_conversations,
    heldout_loss,
    load_chat_data,
    masked_loss,
    pack,
    read_conversations,
    segments,
)
from trainer.data import DataError

TWO_TURNS = [
    {"role": "user", "content": "What does `json.dumps` do?"},
    {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
    {"role": "user", "content": "And `json.loads`?"},
    {"role": "assistant", "content": "Deserialize s to a Python object."},
]


def _conversation(i: int, words: int = 3) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"Question number {i}: " + " ".join(["why"] * (i % 4 + 1))},
        {"role": "assistant", "content": f"Answer {i} " + " ".join(["because"] * (words + i % 5))},
    ]


def _write_jsonl(path: Path, conversations: list[list[dict[str, str]]]) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


def _labelled_runs(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    runs, current = [], []
    for tok, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


# ---------------------------------------------------------------- the loss mask


def test_mask_covers_exactly_the_assistant_replies_and_their_end_token(tokenizer):
    [(ids, mask)] = encode_conversations(tokenizer, [("x.jsonl:1", TWO_TURNS)])
    # The ids are the template's own tokenization.
    expected_ids = tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True)["input_ids"]
    assert ids.tolist() == list(expected_ids)
    runs = [tokenizer.decode(run) for run in _labelled_runs(ids, mask)]
    assert runs == [TWO_TURNS[1]["content"] + "<|im_end|>", TWO_TURNS[3]["content"] + "<|im_end|>"]
    # Everything else, the assistant header included, is not trained on.
    unlabelled = tokenizer.decode(ids[~mask].tolist())
    assert unlabelled.count("<|im_start|>assistant\n") == 2
    assert "Serialize" not in unlabelled and "Deserialize" not in unlabelled
    assert "json.dumps" in unlabelled  # the user turn


def test_packed_labels_are_the_next_assistant_tokens(tokenizer):
    [(ids, mask)] = encode_conversations(tokenizer, [("x.jsonl:1", TWO_TURNS)])
    rows = pack([(ids, mask)], seq_len=len(ids) + 5, pad_id=tokenizer.eos_token_id)
    y = rows.labels[0]
    assert tokenizer.decode(y[y != IGNORE_INDEX].tolist()) == (
        TWO_TURNS[1]["content"] + "<|im_end|>" + TWO_TURNS[3]["content"] + "<|im_end|>"
    )
    # Target t is input t + 1 wherever it is trained on.
    x = rows.tokens[0]
    trained = np.flatnonzero(y[: len(ids) - 2] != IGNORE_INDEX)
    assert (y[trained] == x[trained + 1]).all()


def test_system_message_is_kept_and_not_trained_on(tokenizer):
    messages = [{"role": "system", "content": "You answer in one line."}, *TWO_TURNS[:2]]
    [(ids, mask)] = encode_conversations(tokenizer, [("x.jsonl:1", messages)])
    assert "You answer in one line." in tokenizer.decode(ids[~mask].tolist())
    assert [tokenizer.decode(r) for r in _labelled_runs(ids, mask)] == [messages[2]["content"] + "<|im_end|>"]


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    # The header depends on the number of messages: a prefix renders differently than the whole.
    tok.chat_template = (
        "{{ 'turns: ' + (messages | length | string) + '\n' }}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(DataError, match=r"x\.jsonl:7: .*messages\[1\]"):
        encode_conversations(tok, [("x.jsonl:7", TWO_TURNS)])


def test_a_template_error_names_the_record(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match=r"x\.jsonl:2: the chat template refuses .*roles must alternate"):
        encode_conversations(tok, [("x.jsonl:2", TWO_TURNS)])


def test_a_conversation_starting_with_the_assistant_is_refused(tokenizer):
    with pytest.raises(DataError, match=r"data\.jsonl:3: messages\[0\]: .*system or user message"):
        encode_conversations(tokenizer, [("data.jsonl:3", TWO_TURNS[1:])])


# ---------------------------------------------------------------- packing


def test_packing_restarts_positions_and_keeps_labels_inside_each_conversation(tokenizer):
    convs = [_conversation(i) for i in range(12)]
    encoded = encode_conversations(tokenizer, [(f"f:{i}", m) for i, m in enumerate(convs)])
    longest = max(len(ids) for ids, _ in encoded)
    rows = pack(encoded, seq_len=longest * 2, pad_id=tokenizer.eos_token_id)
    assert rows.tokens.shape == rows.labels.shape == rows.positions.shape == (len(rows), longest * 2)
    assert len(rows) < len(convs)  # several conversations share a row
    expected = {tuple(ids[:-1].tolist()): np.where(mask, ids, IGNORE_INDEX)[1:].tolist() for ids, mask in encoded}
    seen = []
    for r in range(len(rows)):
        for a, b in segments(rows.positions[r]):
            assert rows.positions[r, a:b].tolist() == list(range(b - a))
            x = tuple(rows.tokens[r, a:b].tolist())
            if x in expected:
                # A conversation's targets are exactly its own next tokens: none reaches into a neighbour.
                assert rows.labels[r, a:b].tolist() == expected[x]
                seen.append(x)
            else:  # the padding at the end of a row
                assert b == rows.tokens.shape[1]
                assert (rows.labels[r, a:b] == IGNORE_INDEX).all()
                assert (rows.tokens[r, a:b] == tokenizer.eos_token_id).all()
    assert sorted(seen) == sorted(expected)  # every conversation exactly once
    assert rows.stats.conversations == 12 and rows.stats.rows == len(rows)
    assert rows.stats.assistant_tokens == sum(int(m[1:].sum()) for _, m in encoded)


def test_a_long_conversation_is_truncated_keeping_its_start_and_one_without_replies_is_dropped(tokenizer):
    long = _conversation(1, words=80)
    no_reply = [{"role": "user", "content": "hello"}]
    reply_past_the_cut = [{"role": "user", "content": " ".join(["word"] * 60)}, {"role": "assistant", "content": "ok"}]
    encoded = encode_conversations(tokenizer, [("f:1", long), ("f:2", no_reply), ("f:3", reply_past_the_cut)])
    rows = pack(encoded, seq_len=48, pad_id=tokenizer.eos_token_id)
    assert rows.stats.truncated == 2 and rows.stats.dropped_no_assistant == 2
    assert len(rows) == 1
    assert rows.positions[0].tolist() == list(range(48))
    assert rows.tokens[0].tolist() == encoded[0][0][:48].tolist()  # the start is kept
    assert tokenizer.decode(rows.labels[0][rows.labels[0] != IGNORE_INDEX].tolist()).startswith("Answer 1 because")


# ---------------------------------------------------------------- files, split and cache


def test_load_packs_train_and_heldout_files_and_caches_them(tokenizer, tmp_path, caplog):
    train = _write_jsonl(tmp_path / "train.jsonl", [_conversation(i) for i in range(10)])
    held = _write_jsonl(tmp_path / "heldout.jsonl", [_conversation(i) for i in range(100, 103)])
    spec = ChatDataSpec(sources=(str(train),), val_sources=(str(held),), seq_len=96, cache_dir=str(tmp_path / "c"))
    first = load_chat_data(spec, tokenizer)
    assert not first.from_cache
    assert first.train.stats.conversations == 10 and first.val.stats.conversations == 3
    again = load_chat_data(spec, tokenizer)
    assert again.from_cache
    for name in ("tokens", "labels", "positions"):
        assert np.array_equal(getattr(first.train, name), getattr(again.train, name))
        assert np.array_equal(getattr(first.val, name), getattr(again.val, name))
    # A changed file is a new key.
    _write_jsonl(train, [_conversation(i) for i in range(11)])
    os.utime(train, ns=(1, 1))
    changed = load_chat_data(spec, tokenizer)
    assert not changed.from_cache and changed.train.stats.conversations == 11


def test_val_fraction_holds_out_whole_conversations(tokenizer, tmp_path):
    convs = [_conversation(i) for i in range(40)]
    path = _write_jsonl(tmp_path / "all.jsonl", convs)
    spec = ChatDataSpec(sources=(str(path),), seq_len=64, val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    data = load_chat_data(spec, tokenizer)
    assert data.train.stats.conversations + data.val.stats.conversations == 40
    assert 0 < data.val.stats.conversations < 40

    def conversations(rows: PackedRows) -> set[tuple[int, ...]]:
        return {
            tuple(rows.tokens[r, a:b].tolist())
            for r in range(len(rows))
            for a, b in segments(rows.positions[r])
            if (rows.labels[r, a:b] != IGNORE_INDEX).any()  # not the padding
        }

    assert not (conversations(data.train) & conversations(data.val))
    no_val = load_chat_data(ChatDataSpec(sources=(str(path),), seq_len=64, cache_dir=str(tmp_path / "c")), tokenizer)
    assert no_val.val is None and no_val.train.stats.conversations == 40


def test_parquet_messages_column(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": [_conversation(i) for i in range(3)]}), path)
    assert [m for _, m in read_conversations(path)] == [_conversation(i) for i in range(3)]
    data = load_chat_data(ChatDataSpec(sources=(str(path),), seq_len=64, cache_dir=str(tmp_path / "c")), tokenizer)
    assert data.train.stats.conversations == 3


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        ('{"text": "no messages here"}\n', 1, "record has no 'messages' field"),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}\n\n{"messages": [{"role": "tool", "content": "x"}]}\n',
            3,
            r"messages\[0\]\.role: unknown role 'tool'",
        ),
        ('{"messages": [{"role": "user", "content": 3}]}\n', 1, r"messages\[0\]\.content must be a string"),
        ('{"messages": []}\n', 1, "'messages' must be a non-empty list"),
        ("def not_json():\n    pass\n", 1, "invalid JSON"),
    ],
)
def test_bad_records_name_the_file_and_line(tokenizer, tmp_path, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{path}:{line}: {message}"):
        load_chat_data(ChatDataSpec(sources=(str(path),), seq_len=64, cache_dir=str(tmp_path / "c")), tokenizer)


def test_empty_and_unsupported_files_are_errors(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=rf"{empty}: no conversations \(the file is empty\)"):
        list(read_conversations(empty))
    (tmp_path / "d").mkdir()
    text = tmp_path / "d" / "notes.txt"
    text.write_text("plain text")
    with pytest.raises(DataError, match=rf"{text}: unsupported file type for chat data"):
        load_chat_data(ChatDataSpec(sources=(str(tmp_path / "d"),), seq_len=64, cache_dir=str(tmp_path)), tokenizer)
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_text("not parquet")
    with pytest.raises(DataError, match=rf"{bad_parquet}: unreadable parquet file"):
        list(read_conversations(bad_parquet))


def test_no_assistant_reply_anywhere_is_an_error(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "users.jsonl", [[{"role": "user", "content": "hi"}]])
    with pytest.raises(DataError, match="no conversation with an assistant reply"):
        load_chat_data(ChatDataSpec(sources=(str(path),), seq_len=64, cache_dir=str(tmp_path / "c")), tokenizer)


# ---------------------------------------------------------------- batches


def _rows(n: int, seq_len: int = 8) -> PackedRows:
    base = np.arange(n, dtype=np.int32)[:, None] * 100 + np.arange(seq_len, dtype=np.int32)
    return PackedRows(base, base + 1, np.tile(np.arange(seq_len, dtype=np.int32), (n, 1)))


def test_batches_are_deterministic_cover_each_epoch_and_resume_from_an_integer():
    rows = _rows(10)
    sampler, other = ChatBatches(rows, 4, seed=3), ChatBatches(rows, 4, seed=3)
    drawn = [sampler.next_batch() for _ in range(5)]  # 20 rows: two epochs
    again = [other.next_batch() for _ in range(5)]
    for b, c in zip(drawn, again, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(b, c, strict=True))
    ids = torch.cat([b[0][:, 0] for b in drawn]) // 100
    assert sorted(ids[:10].tolist()) == list(range(10)) and sorted(ids[10:].tolist()) == list(range(10))
    assert ids[:10].tolist() != ids[10:].tolist()  # a fresh order each epoch
    x, y, pos = drawn[0]
    assert x.dtype == y.dtype == pos.dtype == torch.int64 and x.shape == (4, 8)
    assert not torch.equal(ChatBatches(rows, 4, seed=4).next_batch()[0], drawn[0][0])

    state = ChatBatches(rows, 4, seed=3)
    for _ in range(3):
        state.next_batch()
    resumed = ChatBatches(rows, 4, seed=3)
    resumed.load_state_dict(state.state_dict())
    assert state.state_dict() == {"batches_drawn": 3}
    assert torch.equal(resumed.next_batch()[0], drawn[3][0])


def test_ranks_share_the_single_process_batch():
    rows = _rows(9)
    whole = ChatBatches(rows, 4, seed=1)
    ranks = [ChatBatches(rows, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        assert torch.equal(whole.next_batch()[0], torch.cat([s.next_batch()[0] for s in ranks]))
    with pytest.raises(DataError, match="divisible"):
        ChatBatches(rows, 3, seed=1, world_size=2)


# ---------------------------------------------------------------- loss


def test_masked_loss_averages_over_assistant_targets_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.tensor([[1, IGNORE_INDEX, 3, IGNORE_INDEX, 4], [IGNORE_INDEX] * 4 + [7]])
    keep = targets != IGNORE_INDEX
    assert torch.allclose(masked_loss(logits, targets), F.cross_entropy(logits[keep], targets[keep]))


def test_heldout_loss_runs_each_conversation_alone(tokenizer):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny")).eval()
    model.init_weights(seed=0)
    convs = encode_conversations(tokenizer, [(f"f:{i}", _conversation(i)) for i in range(4)])
    packed = pack(convs, seq_len=256, pad_id=tokenizer.eos_token_id)
    assert len(packed) == 1
    loss, n = heldout_loss(model, packed)
    total, count = 0.0, 0
    for ids, mask in convs:  # the reference: each conversation on its own, labels from the mask
        ids_t = torch.from_numpy(ids.astype(np.int64))
        target = torch.where(torch.from_numpy(mask), ids_t, IGNORE_INDEX)[1:]
        with torch.no_grad():
            logits = model(ids_t[None, :-1])[0]
        total += F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((target != IGNORE_INDEX).sum())
    assert n == count == packed.stats.assistant_tokens
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_stdlib_qa_sources_are_made_once_in_the_cache(tokenizer, tmp_path):
    spec = ChatDataSpec(
        sources=("stdlib-qa:train",), val_sources=("stdlib-qa:heldout",), seq_len=256, cache_dir=str(tmp_path)
    )
    data = load_chat_data(spec, tokenizer)
    [made] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert made.name.startswith("stdlib-qa-py") and (made / "heldout.jsonl").is_file()
    assert data.train.stats.conversations > 5 * data.val.stats.conversations > 0
    assert data.train.stats.dropped_no_assistant == data.train.stats.truncated == 0
    assert load_chat_data(spec, tokenizer).from_cache  # the files were not rewritten
    with pytest.raises(DataError, match="stdlib-qa:test: expected stdlib-qa:train or stdlib-qa:heldout"):
        load_chat_data(ChatDataSpec(sources=("stdlib-qa:test",), seq_len=64, cache_dir=str(tmp_path)), tokenizer)
    notes = tmp_path / "notes.txt"
    notes.write_text("plain text")
    with pytest.raises(DataError, match=rf"{notes}: unsupported file type for chat data"):
        load_chat_data(ChatDataSpec(sources=(str(notes),), seq_len=64, cache_dir=str(tmp_path)), tokenizer)


def test_the_cli_reports_loss_and_answers_of_a_checkpoint(tokenizer, tmp_path, capsys):
    from model.checkpoint import save_checkpoint
    from trainer.chat_data import chat_prompt_ids, main

    model = Transformer(ModelConfig.from_name("tiny"))
    model.init_weights(seed=0)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    data = _write_jsonl(tmp_path / "held.jsonl", [_conversation(i) for i in range(3)])
    assert main(["--checkpoint", str(ckpt), "--data", str(data), "--ask", "What does `json.dumps` do?"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["assistant_tokens"] > 0 and report["loss"] > 0
    assert isinstance(report["answers"]["What does `json.dumps` do?"], str)
    prompt = tokenizer.decode(chat_prompt_ids(tokenizer, "hi"))
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_sft_demo_config_is_valid():
    from trainer.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "trainer/configs/sft-demo.yaml")
    assert cfg.init_from == "bundled" and cfg.dtype == "float32" and cfg.data.format == "chat"
    spec = ChatDataSpec.from_data_config(cfg.data)
    assert spec.sources == ("stdlib-qa:train",) and spec.val_sources == ("stdlib-qa:heldout",)
    assert spec.seq_len == 256


@pytest.mark.skipif(
    "positions" not in inspect.signature(Transformer.forward).parameters,
    reason="needs Transformer.forward(idx, positions) that keeps attention inside each run of positions",
)
def test_packed_conversations_do_not_attend_to_each_other(tokenizer):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny")).eval()
    model.init_weights(seed=0)
    convs = encode_conversations(tokenizer, [(f"f:{i}", _conversation(i)) for i in range(3)])
    rows = pack(convs, seq_len=256, pad_id=tokenizer.eos_token_id)
    assert len(rows) == 1 and len(segments(rows.positions[0])) == 4  # three conversations and the padding
    x, y, pos = ChatBatches(rows, 1, seed=0).next_batch()
    with torch.no_grad():
        packed = model(x, positions=pos)[0]  # (T, vocab)
        for a, b in segments(rows.positions[0]):
            alone = model(x[:, a:b])[0]
            assert torch.allclose(packed[a:b], alone, atol=1e-4), (a, b)
