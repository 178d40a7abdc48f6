"""Text sources read through Hugging Face `datasets` (jsonl, arrow: streamed, offline) or pyarrow's batch
iterator (parquet), with bounded memory, and tokenized by several processes into the same token file."""

import json
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer import data, hf_datasets, tokenize_pool
from trainer.config import DataConfig
from trainer.data import DataError, load_tokens


def _cfg(tmp_path, sources, cache="cache", **kw):
    return DataConfig(sources=[str(s) for s in sources], cache_dir=str(tmp_path / cache), **kw)


def _write_arrow(path, texts, column="text"):
    with pa.ipc.new_stream(str(path), pa.schema([(column, pa.string())])) as w:
        w.write_table(pa.table({column: texts}))


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 30)))) for _ in range(n)]


def test_jsonl_and_arrow_go_through_datasets_offline_and_parquet_through_pyarrow(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "a json line"}) + "\n\n" + json.dumps({"text": "two"}))
    pq.write_table(pa.table({"text": ["a parquet row", None, ""]}), tmp_path / "b.parquet")
    _write_arrow(tmp_path / "c.arrow", ["an arrow row"])
    streamed = []
    real_stream = hf_datasets.stream

    def spy(path, cache_dir=None):
        ds = real_stream(path, cache_dir)
        streamed.append((path.name, type(ds).__name__))
        return ds

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(hf_datasets, "stream", spy)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    tf = load_tokens(_cfg(tmp_path, [tmp_path]), tokenizer, eos_id=2)
    assert streamed == [(n, "IterableDataset") for n in ("a.jsonl", "c.arrow")]
    expected = []
    for text in ["a json line", "two", "a parquet row", "an arrow row"]:  # null and empty rows skipped
        expected += tokenizer.encode(text, add_special_tokens=False) + [2]
    assert tf.tokens.tolist() == expected and tf.n_docs == 4
    # Streaming copies nothing into an Arrow cache: the datasets cache holds at most lock files.
    hf_cache = tmp_path / "cache" / "hf-datasets"
    assert not [p for p in hf_cache.rglob("*") if p.suffix == ".arrow"]


def test_bad_files_are_named(tmp_path, tokenizer):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\nnot json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: unreadable json file"):
        load_tokens(_cfg(tmp_path, [tmp_path / "bad.jsonl"]), tokenizer, eos_id=2)
    (tmp_path / "gap.jsonl").write_text(json.dumps({"text": "ok"}) + "\n\n" + json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(DataError, match=r"gap\.jsonl:3: record has no string field 'text'"):
        load_tokens(_cfg(tmp_path, [tmp_path / "gap.jsonl"]), tokenizer, eos_id=2)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match=r"nocol\.parquet: no column 'text' \(columns: \['body'\]\)"):
        load_tokens(_cfg(tmp_path, [tmp_path / "nocol.parquet"]), tokenizer, eos_id=2)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints\.parquet: column 'text' holds int64, not text"):
        load_tokens(_cfg(tmp_path, [tmp_path / "ints.parquet"]), tokenizer, eos_id=2)
    (tmp_path / "junk.arrow").write_bytes(b"not an arrow stream")
    with pytest.raises(DataError, match=r"junk\.arrow: unreadable arrow file"):
        load_tokens(_cfg(tmp_path, [tmp_path / "junk.arrow"]), tokenizer, eos_id=2)


def test_several_processes_write_the_same_token_file_as_one(tmp_path, tokenizer):
    docs = _docs(1400)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:600]))
    pq.write_table(pa.table({"text": docs[600:1100]}), tmp_path / "src" / "b.parquet")
    _write_arrow(tmp_path / "src" / "c.arrow", docs[1100:])
    (tmp_path / "src" / "d.txt").write_text("a plain text file")
    one = load_tokens(_cfg(tmp_path, [tmp_path / "src"], "c1", num_proc=1), tokenizer, eos_id=2)
    two = load_tokens(_cfg(tmp_path, [tmp_path / "src"], "c2", num_proc=2), tokenizer, eos_id=2)
    assert not one.from_cache and not two.from_cache
    assert one.path.read_bytes() == two.path.read_bytes() and one.n_docs == two.n_docs == 1401
    # A max_tokens cut inside a chunk counts the same documents either way.
    cut = int(len(one.tokens) * 0.6) + 1
    a = load_tokens(_cfg(tmp_path, [tmp_path / "src"], "c3", num_proc=1, max_tokens=cut), tokenizer, eos_id=2)
    b = load_tokens(_cfg(tmp_path, [tmp_path / "src"], "c4", num_proc=2, max_tokens=cut), tokenizer, eos_id=2)
    assert a.tokens.tolist() == b.tokens.tolist() == one.tokens[:cut].tolist() and a.n_docs == b.n_docs
    starts = np.concatenate([[0], np.flatnonzero(np.asarray(one.tokens) == 2)[:-1] + 1])
    assert a.n_docs == int((starts < cut).sum())


def test_the_pipeline_reads_a_bounded_distance_ahead_of_the_writer(tokenizer):
    consumed = 0

    def documents():
        nonlocal consumed
        for text in _docs(600, seed=1):
            consumed += 1
            yield text

    backend = tokenizer.backend_tokenizer
    chunk, num_proc = 8, 2
    seen = []
    for k, (ids, lengths) in enumerate(tokenize_pool.encoded_chunks(documents(), backend, 2, num_proc, chunk)):
        # Read so far: the chunks handed over, those in flight (2 per process) and the one being submitted.
        assert consumed <= (k + 1 + 2 * num_proc + 1) * chunk, (k, consumed)
        seen.append((ids, lengths))
    assert consumed == 600 and sum(len(ln) for _, ln in seen) == 600
    inline = list(tokenize_pool.encoded_chunks(_docs(600, seed=1), backend, 2, 1, chunk))
    assert all(np.array_equal(a, c) and np.array_equal(b, d) for (a, b), (c, d) in zip(seen, inline, strict=True))


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_reading_a_large_file_holds_a_bounded_share_of_it_in_memory(tmp_path, suffix):
    n, width = 100_000, 200
    texts = [f"{i:08d} " + "y" * (width - 9) for i in range(n)]  # 20 MB of text
    path = tmp_path / f"big{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.table({"text": texts}), path, row_group_size=1000)
    else:
        with pa.ipc.new_stream(str(path), pa.schema([("text", pa.string())])) as w:
            for s in range(0, n, 1000):
                w.write_table(pa.table({"text": texts[s : s + 1000]}))
    del texts
    peak = count = 0
    for count, text in enumerate(data._documents(path, "text", tmp_path / "hf"), 1):
        if count % 500 == 0:
            peak = max(peak, pa.total_allocated_bytes())  # Arrow's own buffers, which Python does not see
        assert len(text) == width
    assert count == n
    assert peak < n * width / 4, f"{peak / 1e6:.1f} MB of Arrow memory for {n * width / 1e6:.0f} MB of text"
