import pytest
from transformers import LlamaConfig

from model.config import PRESETS, ModelConfig


def test_seed_preset_values():
    c = ModelConfig.from_name("smollm2-135m")
    assert (c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd) == (2048, 49152, 30, 9, 576)
    assert (c.intermediate_size, c.n_kv_head, c.norm_eps, c.rope_theta) == (1536, 3, 1e-5, 100000.0)
    assert c.tie_embeddings and c.head_dim == 64 and c.n_rep == 3
    assert 134e6 < c.num_params() < 135e6  # SmolLM2-135M has 134.5M parameters


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
