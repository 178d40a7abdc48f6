import pytest
from transformers import LlamaConfig

from model.config import PRESETS, ModelConfig


def test_seed_preset_values():
    c = ModelConfig.from_name("smollm2-135m")
    assert (c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd) == (2048, 49152, 30, 9, 576)
    # The pretraining stage's theta (the released 100000 comes from the later long-context stage).
    assert (c.intermediate_size, c.n_kv_head, c.norm_eps, c.rope_theta) == (1536, 3, 1e-5, 10000.0)
    assert c.tie_embeddings and c.head_dim == 64 and c.n_rep == 3
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.init_std) == (0, 0, None, 1 / 24)
    assert 134e6 < c.num_params() < 135e6  # SmolLM2-135M has 134.5M parameters


def test_init_std_is_hf_initializer_range():
    c = ModelConfig(init_std=0.05)
    assert c.to_hf_dict()["initializer_range"] == 0.05
    assert ModelConfig.from_hf_dict(c.to_hf_dict()).init_std == 0.05
    # A checkpoint that predates the field, or a config.json without it: HF's default.
    hf = {k: v for k, v in c.to_hf_dict().items() if k != "initializer_range"}
    assert ModelConfig.from_hf_dict(hf).init_std == 0.02
    for bad in (0.0, -0.01):
        with pytest.raises(ValueError, match="init_std"):
            ModelConfig(init_std=bad)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_hf_config(name):
    c = ModelConfig.from_name(name)
    hf = LlamaConfig(**c.to_hf_dict())
    assert ModelConfig.from_hf_dict(hf.to_dict()) == c


def test_unknown_preset_names_choices():
    with pytest.raises(ValueError, match="tiny"):
        ModelConfig.from_name("nope")


def test_invalid_shapes_rejected():
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(n_head=9, n_kv_head=2)
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelConfig.from_hf_dict({**ModelConfig().to_hf_dict(), "rope_scaling": {"type": "linear", "factor": 2.0}})


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}},
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
        {"rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    ],
    ids=["llama3", "yarn", "partial", "old-key-dynamic"],
)
def test_rope_variants_we_do_not_implement_are_refused(rope):
    hf = {**ModelConfig().to_hf_dict(), "rope_scaling": None, **rope}
    with pytest.raises(ValueError, match=next(iter(rope))):
        ModelConfig.from_hf_dict(hf)


def test_transformers_5_plain_rope_parameters_load_with_their_theta():
    hf = {k: v for k, v in ModelConfig().to_hf_dict().items() if k not in ("rope_theta", "rope_scaling")}
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    assert ModelConfig.from_hf_dict(hf).rope_theta == 12345.0
