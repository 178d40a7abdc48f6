import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trainer import data
from trainer.config import DataConfig
from trainer.data import DataError, WindowSampler, load_tokens, resolve_sources, split_tokens


def _cfg(tmp_path, sources, **kw):
    return DataConfig(sources=[str(s) for s in sources], cache_dir=str(tmp_path / "cache"), **kw)


def test_txt_jsonl_parquet_documents_joined_by_eos(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first record"}) + "\n\n" + json.dumps({"text": "second"}))
    pq.write_table(pa.table({"text": ["a parquet row", ""], "id": [1, 2]}), tmp_path / "c.parquet")
    tf = load_tokens(_cfg(tmp_path, [tmp_path]), tokenizer, eos_id=2)
    expected = []
    for text in ["hello world", "first record", "second", "a parquet row"]:  # sorted files, empty rows skipped
        expected += tokenizer.encode(text, add_special_tokens=False) + [2]
    assert tf.tokens.dtype == np.uint16
    assert tf.tokens.tolist() == expected and tf.n_docs == 4


def test_cache_is_reused_and_invalidated_by_a_change(tmp_path, tokenizer, monkeypatch):
    f = tmp_path / "a.txt"
    f.write_text("some text to tokenize once " * 20)
    cfg = _cfg(tmp_path, [f])
    first = load_tokens(cfg, tokenizer, eos_id=2)
    assert not first.from_cache

    def boom(*args, **kwargs):
        raise AssertionError("re-tokenized a cached corpus")

    with monkeypatch.context() as m:
        m.setattr(data, "_tokenize_to", boom)
        second = load_tokens(cfg, tokenizer, eos_id=2)
    assert second.from_cache and second.path == first.path
    assert np.array_equal(second.tokens, first.tokens)
    # No temporary files are left in the cache.
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
    f.write_text("changed text")
    third = load_tokens(cfg, tokenizer, eos_id=2)
    assert not third.from_cache and third.path != first.path


def test_max_tokens_bounds_the_corpus(tmp_path, tokenizer):
    f = tmp_path / "a.txt"
    f.write_text("many words here " * 200)
    assert len(load_tokens(_cfg(tmp_path, [f], max_tokens=50), tokenizer, eos_id=2).tokens) == 50


def test_missing_and_empty_sources(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        resolve_sources([str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match=r"\*\.jsonl: no"):
        resolve_sources([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        resolve_sources([str(tmp_path / "x.csv")])
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(DataError, match="empty"):
        load_tokens(_cfg(tmp_path, [tmp_path / "empty.txt"]), tokenizer, eos_id=2)
    (tmp_path / "bad.jsonl").write_text('{"content": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: .*'text'"):
        load_tokens(_cfg(tmp_path, [tmp_path / "bad.jsonl"]), tokenizer, eos_id=2)


def test_stdlib_corpus_is_bounded_by_max_files():
    files = resolve_sources(["stdlib"], max_files=25)
    assert len(files) == 25 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_split_keeps_a_validation_tail():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens, 0.1, seq_len=16)
    assert len(train) == 900 and val[0] == 900
    with pytest.raises(DataError, match="too few"):
        split_tokens(tokens[:20], 0.0, seq_len=32)


def test_sampler_state_round_trip_and_rank_shards():
    tokens = np.arange(5000, dtype=np.uint16)
    a = WindowSampler(tokens, 16, 4, seed=3)
    a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = WindowSampler(tokens, 16, 4, seed=99)
    b.load_state_dict(state)
    for (x1, y1, p1), (x2, y2, p2) in zip(expected, [b.next_batch() for _ in range(3)], strict=True):
        assert x1.equal(x2) and y1.equal(y2) and p1 is p2 is None  # a window is one sequence
    x, y, _ = expected[0]
    assert x.shape == (4, 16) and y[:, :-1].equal(x[:, 1:])
    # Two ranks draw the same global batch and each keeps its half.
    single = WindowSampler(tokens, 16, 4, seed=5).next_batch()[0]
    halves = [WindowSampler(tokens, 16, 4, seed=5, rank=r, world_size=2).next_batch()[0] for r in (0, 1)]
    assert single.equal(torch.cat(halves))


def test_the_stdlib_source_is_every_standard_library_module_and_no_installed_package():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = data.stdlib_files()
    assert files == sorted(files) and len(files) > 500
    assert root / "os.py" in files and root / "json" / "__init__.py" in files
    for f in files:
        parts = f.relative_to(root).parts
        assert f.suffix == ".py" and f.is_file(), f
        assert not {"site-packages", "dist-packages", "__pycache__"} & set(parts), f
    # Nothing under the standard library's folder that is not skipped is left out.
    everything = [
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)
    ]
    assert sorted(everything) == files
