"""Weighted mixtures of text sources: config, proportions, exact resume, per-source validation, the record."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from model.run_dir import LATEST_FILE, STATE_FILE, SUMMARY_FILE
from trainer.config import ConfigError, DataConfig, build_config
from trainer.data import DataError
from trainer.loop import prepare, run
from trainer.mixture import Mixture, MixtureSampler, Source, load_mixture
from trainer.progress import read_metrics


def _mixture(weights, n=4000):
    # Source i holds the token ids i * 10000 + 0..n-1: a window tells which source it came from.
    return Mixture(
        [
            Source(f"s{i}", f"/data/s{i}", w, (i * 10000 + np.arange(n)).astype(np.uint16), None, 1, False)
            for i, w in enumerate(weights)
        ]
    )


def test_windows_follow_the_weights_and_come_from_their_source():
    mixture = _mixture([0.7, 0.2, 0.1, 0.0])
    sampler = MixtureSampler(mixture, seq_len=16, batch_size=8, seed=11)
    counts = np.zeros(4)
    for _ in range(1500):
        x, y, positions = sampler.next_batch()
        assert positions is None and x.shape == y.shape == (8, 16) and y[:, :-1].equal(x[:, 1:])
        source = x[:, 0] // 10000
        assert (x // 10000 == source[:, None]).all() and (y // 10000 == source[:, None]).all()  # one source each
        counts += np.bincount(source.numpy(), minlength=4)
    shares = counts / counts.sum()
    assert np.allclose(shares, [0.7, 0.2, 0.1, 0.0], atol=0.015), shares  # 12000 draws: std <= 0.0042
    assert counts[3] == 0  # weight 0: validation only
    assert [d["windows_drawn"] for d in sampler.state_dict()["mixture"]] == counts.astype(int).tolist()


def test_resume_draws_exactly_the_same_windows_and_ranks_split_the_batch():
    mixture = _mixture([3.0, 1.0])
    a = MixtureSampler(mixture, 16, 4, seed=3)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint carries survives serialisation
    expected = [a.next_batch() for _ in range(20)]
    b = MixtureSampler(mixture, 16, 4, seed=99)
    b.load_state_dict(state)
    for (x1, y1, _), (x2, y2, _) in zip(expected, [b.next_batch() for _ in range(20)], strict=True):
        assert x1.equal(x2) and y1.equal(y2)
    assert b.state_dict() == a.state_dict()
    single = MixtureSampler(mixture, 16, 4, seed=5).next_batch()[0]
    halves = [MixtureSampler(mixture, 16, 4, seed=5, rank=r, world_size=2).next_batch()[0] for r in (0, 1)]
    assert single.equal(torch.cat(halves))


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([{"path": "a", "weight": -0.5}], r"data\.sources\[0\]\.weight: Input should be greater than or equal to 0"),
        ([{"path": "a", "weight": 0}, {"path": "b", "weight": 0.0}], r"data\.sources: the weights sum to 0"),
        (["x", {"path": "a", "wieght": 1}], r"data\.sources\[1\]\.wieght: unknown key"),
        ([{"path": "a", "weight": "lots"}], r"data\.sources\[0\]\.weight: Input should be a valid number"),
        ([{"weight": 1}], r"data\.sources\[0\]\.path: Field required"),
        ([{"path": "a", "name": "web crawl"}], r"data\.sources\[0\]\.name: 'web crawl' may hold only"),
        ([{"path": "d1/web.jsonl"}, "d2/web"], r"data\.sources\[1\]\.name: 'web' is also the name of"),
    ],
)
def test_bad_mixture_configs_name_the_key(sources, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"data": {"sources": sources}})


def test_plain_sources_stay_plain_and_mappings_round_trip():
    plain = build_config({"data": {"sources": ["a.txt", "b/"]}}).data
    assert plain.sources == ["a.txt", "b/"] and not plain.is_mixture
    raw = {"sources": [{"path": "data/web/*.parquet", "weight": 0.7}, "wiki.jsonl", {"path": "c", "name": "code"}]}
    mixed = DataConfig.model_validate(raw)
    assert mixed.is_mixture and mixed.source_paths == ["data/web/*.parquet", "wiki.jsonl", "c"]
    assert [(s.name, s.weight) for s in mixed.mixture_sources()] == [("web", 0.7), ("wiki", 1.0), ("code", 1.0)]
    assert DataConfig.model_validate(mixed.model_dump(mode="json")) == mixed
    with pytest.raises(ConfigError, match=r"data: .*weighted sources .* are for format: text"):
        build_config({"data": {"format": "chat", "sources": [{"path": "chats.jsonl"}]}})
    with pytest.raises(ConfigError, match=r"data\.sources: .*needs real pretraining data"):
        build_config({"data": {"sources": [{"path": "stdlib"}], "require_real_data": True}})


@pytest.fixture
def two_sources(corpus, tmp_path):
    """The test corpus split into two sources of four files each."""
    for name, files in (("web", sorted(corpus.iterdir())[:4]), ("code", sorted(corpus.iterdir())[4:])):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f.name).write_text(f.read_text())
    return tmp_path / "web", tmp_path / "code"


def test_each_source_is_tokenized_and_split_on_its_own(two_sources, tokenizer, tmp_path):
    web, code = two_sources
    cfg = DataConfig(
        sources=[{"path": str(web), "weight": 3}, {"path": str(code), "weight": 1, "name": "py"}],
        val_fraction=0.1,
        seq_len=32,
        cache_dir=str(tmp_path / "cache"),
    )
    mixture = load_mixture(cfg, tokenizer, eos_id=0)
    assert [(s.name, s.weight) for s in mixture.sources] == [("web", 3.0), ("py", 1.0)]
    for s, d in zip(mixture.sources, mixture.describe(), strict=True):
        assert len(s.val) == max(int((len(s.train) + len(s.val)) * 0.1), 33)
        assert d["train_tokens"] == len(s.train) and d["val_tokens"] == len(s.val) and d["documents"] == 4
    assert [d["share"] for d in mixture.describe()] == [0.75, 0.25]
    held = mixture.held_out()
    overall, by_source = held.evaluate(lambda tokens: float(tokens[0]))  # a stand-in "loss": the first token id
    assert by_source == {"web": float(held.tokens["web"][0]), "py": float(held.tokens["py"][0])}
    assert overall == pytest.approx(0.75 * by_source["web"] + 0.25 * by_source["py"])
    small = DataConfig(sources=[str(web), {"path": str(code), "name": "py"}], seq_len=4000, cache_dir=cfg.cache_dir)
    with pytest.raises(DataError, match=r"data\.sources\[0\] \(web\): the corpus has \d+ tokens: too few"):
        load_mixture(small, tokenizer, eos_id=0)
    missing = DataConfig(sources=[{"path": str(tmp_path / "nowhere"), "name": "x"}], cache_dir=cfg.cache_dir)
    with pytest.raises(DataError, match=r"^data\.sources\[0\] \(x\): \S*nowhere: no such file or directory$"):
        load_mixture(missing, tokenizer, eos_id=0)


def test_training_on_a_mixture_reports_each_source_records_the_mixture_and_resumes_exactly(
    two_sources, make_config, tmp_path, losses
):
    web, code = two_sources
    sources = f"data.sources=[{{path: {web}, weight: 0.7}}, {{path: {code}, weight: 0.3, name: py}}]"
    cfg = make_config(
        sources, "data.val_fraction=0.1", "eval_every=2", "eval_steps=2", "max_steps=4", "checkpoint_every=2"
    )
    out = tmp_path / "out"
    run(prepare(cfg), out)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert math.isfinite(r["val_loss/web"]) and math.isfinite(r["val_loss/py"])
        assert r["val_loss"] == pytest.approx(0.7 * r["val_loss/web"] + 0.3 * r["val_loss/py"])
    summary = json.loads((out / "step-000004" / SUMMARY_FILE).read_text())
    assert summary["val_loss"] == pytest.approx(evals[-1]["val_loss"])
    mixture = summary["mixture"]
    assert [(m["name"], m["weight"], m["share"]) for m in mixture] == [("web", 0.7, 0.7), ("py", 0.3, 0.3)]
    assert all(m["train_tokens"] > 0 and m["val_tokens"] > 0 for m in mixture)
    assert sum(m["windows_drawn"] for m in mixture) == 4 * cfg.batch_size
    state = torch.load(out / "step-000004" / STATE_FILE, weights_only=False)
    assert state["data"]["mixture"] == mixture
    # Resumed from step 2, the run draws the same windows: the same losses, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "step-000004")
    (resumed / LATEST_FILE).write_text("step-000002\n")
    assert run(prepare(cfg), resumed).start_step == 2
    assert losses(resumed) == losses(out)
