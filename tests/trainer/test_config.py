from pathlib import Path

import pytest

from trainer.config import ConfigError, build_config, load_config
from trainer.init_source import resolve_model_source

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key"):
        build_config({}, ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"^batchsize: unknown key"):
        build_config({"batchsize": 4})


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        build_config({}, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"dtype"):
        build_config({}, ["dtype=float16"])
    with pytest.raises(ConfigError, match=r"min_lr"):
        build_config({}, ["optim.lr=1e-4", "optim.min_lr=1e-3"])


def test_overrides_are_parsed_as_yaml_and_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\nbatch_size: 2\n")
    cfg = load_config(
        path, ["optim.lr=1e-3", "optim.betas=[0.8, 0.9]", "data.sources=[a.txt, b.jsonl]", "metrics_port=null"]
    )
    assert cfg.optim.lr == 1e-3 and cfg.batch_size == 2
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.sources == ["a.txt", "b.jsonl"]
    assert cfg.metrics_port is None


@pytest.mark.parametrize("override", ["seed.x=1", "no_equals_sign", "=3"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError):
        build_config({}, [override])


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_shipped_configs_validate(name):
    load_config(CONFIGS / f"{name}.yaml")


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-135m-long-context"])
def test_recipes_validate_with_real_data(name):
    # They refuse the stdlib corpus (tests/trainer/test_recipe.py checks their values against the published ones).
    load_config(CONFIGS / f"{name}.yaml", ["data.sources=[/data/corpus/]"])


def test_seq_len_above_block_size_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"data\.seq_len=512 exceeds the model's block size 256"):
        resolve_model_source(make_config("data.seq_len=512"))


def test_missing_init_checkpoint_is_refused(make_config, tmp_path):
    with pytest.raises(ConfigError, match=r"init_from: .*nowhere"):
        resolve_model_source(make_config(f"init_from={tmp_path / 'nowhere'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"config\.json"):
        resolve_model_source(make_config(f"init_from={tmp_path / 'empty'}"))
