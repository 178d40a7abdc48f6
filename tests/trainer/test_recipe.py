"""The SmolLM2-135M recipe (trainer/configs/smollm2-135m.yaml) against the published values, its refusal to
pretrain on the stdlib demo corpus, and the long-context stage that continues a stage-1 checkpoint."""

import json
import math
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_model
from model.config import ModelConfig
from model.rope import precompute_rope
from trainer.config import ConfigError, load_config
from trainer.data import DataError, load_tokens, separator_id
from trainer.init_source import build_model, resolve_model_source
from trainer.loop import prepare, run
from trainer.optim import lr_at

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"
RECIPE = CONFIGS / "smollm2-135m.yaml"
LONG_CONTEXT = CONFIGS / "smollm2-135m-long-context.yaml"
REAL_DATA = "data.sources=[/data/corpus/]"  # validation only looks at the names; nothing is read

# SmolLM2-135M as published. The nanotron config of the run (huggingface/smollm, pre-training/smollm2/
# config_smollm2_135M.yaml, also HuggingFaceTB/SmolLM2-135M/config_smollm2_135M.yaml): model_config,
# init_method.std, optimizer, learning_rate_scheduler, tokens, checkpoint_interval, general.seed. Its global batch:
# micro_batch_size 8 x dp 64 x batch_accumulation_per_replica 1 = 512 sequences of 2048 tokens. nanotron's
# StandardParametrizator applies init std to embeddings and column-parallel linears and std / sqrt(2 * layers) to
# the row-parallel ones (o_proj, down_proj). The model card and the SmolLM2 paper (arXiv 2502.02737): 2T tokens,
# documents separated by <|endoftext|> (the base model's bos = eos = 0).
PUBLISHED = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "init_std": 0.041666666666666664,
    "learning_rate": 3e-3,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "adam_eps": 1e-8,
    "weight_decay": 0.01,
    "clip_grad": 1.0,
    "lr_warmup_steps": 2000,
    "lr_decay_starting_step": 1_600_000,
    "lr_decay_steps": 400_000,
    "min_decay_lr": 0.0,
    "sequence_length": 2048,
    "global_batch_sequences": 512,
    "train_steps": 2_000_000,
    "dtype": "bfloat16",
    "document_separator": "<|endoftext|>",
    "document_separator_id": 0,
    "checkpoint_interval": 2000,
    "seed": 8,
}
# The released HuggingFaceTB/SmolLM2-135M config.json: the values after the long-context stage.
PUBLISHED_LONG_CONTEXT = {"rope_theta": 100000.0, "max_position_embeddings": 8192}


@pytest.fixture(scope="module")
def recipe():
    return load_config(RECIPE, [REAL_DATA])


def test_model_matches_the_published_model_config(recipe):
    config = resolve_model_source(recipe).config
    hf = config.to_hf_dict()  # what every checkpoint's config.json says
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "tie_word_embeddings",
        "max_position_embeddings",
        "rope_theta",
        "bos_token_id",
        "eos_token_id",
    ):
        assert hf[key] == PUBLISHED[key], key
    assert config.init_std == PUBLISHED["init_std"] == 1 / math.sqrt(576)
    assert hf["initializer_range"] == PUBLISHED["init_std"]
    assert recipe.data.seq_len == config.block_size == PUBLISHED["sequence_length"]


def test_optimizer_batch_and_length_match_the_published_ones(recipe):
    o = recipe.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.min_lr) == (
        PUBLISHED["learning_rate"],
        (PUBLISHED["adam_beta1"], PUBLISHED["adam_beta2"]),
        PUBLISHED["adam_eps"],
        PUBLISHED["weight_decay"],
        PUBLISHED["min_decay_lr"],
    )
    assert (o.schedule, o.warmup_steps) == ("wsd", PUBLISHED["lr_warmup_steps"])
    assert recipe.grad_clip == PUBLISHED["clip_grad"] and recipe.dtype == PUBLISHED["dtype"]
    assert recipe.max_steps == PUBLISHED["train_steps"]
    assert recipe.batch_size * recipe.grad_accum == PUBLISHED["global_batch_sequences"]
    assert recipe.tokens_per_step == 512 * 2048 == 1_048_576
    assert recipe.checkpoint_every == PUBLISHED["checkpoint_interval"] and recipe.seed == PUBLISHED["seed"]


def test_schedule_is_warmup_then_constant_then_the_published_linear_decay(recipe):
    o, n = recipe.optim, recipe.max_steps
    warmup, start, span = PUBLISHED["lr_warmup_steps"], PUBLISHED["lr_decay_starting_step"], PUBLISHED["lr_decay_steps"]
    peak = PUBLISHED["learning_rate"]
    assert lr_at(0, o, n) == pytest.approx(peak / warmup)
    assert lr_at(warmup - 1, o, n) == pytest.approx(peak)
    assert lr_at(warmup, o, n) == lr_at(start - 1, o, n) == peak  # stable
    assert lr_at(start, o, n) < peak  # 20% of the run decays: 1.6M .. 2M
    assert lr_at(start + span // 2 - 1, o, n) == pytest.approx(peak / 2)
    assert lr_at(start + span - 1, o, n) == pytest.approx(PUBLISHED["min_decay_lr"])
    assert start + span == n and span / n == pytest.approx(0.2)


def test_documents_end_with_endoftext_in_the_recipe_and_with_eos_elsewhere(recipe, tokenizer, tmp_path):
    assert tokenizer.convert_ids_to_tokens(PUBLISHED["document_separator_id"]) == PUBLISHED["document_separator"]
    assert recipe.data.doc_separator == PUBLISHED["document_separator"]
    # The Instruct tokenizer's eos (<|im_end|>, 2) is not what the recipe separates documents with.
    assert separator_id(recipe.data, tokenizer, eos_id=2) == 0
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"document {name}")
    expected = []
    for name in ("a.txt", "b.txt"):
        expected += tokenizer.encode(f"document {name}", add_special_tokens=False) + [0]
    data = recipe.data.model_copy(update={"sources": [str(tmp_path)], "cache_dir": str(tmp_path / "cache")})
    assert load_tokens(data, tokenizer, eos_id=2).tokens.tolist() == expected
    # The default (every other shipped config) is still the model's eos.
    default = data.model_copy(update={"doc_separator": "eos"})
    assert load_tokens(default, tokenizer, eos_id=2).tokens.tolist() == [2 if t == 0 else t for t in expected]
    assert separator_id(data.model_copy(update={"doc_separator": 5}), tokenizer, eos_id=2) == 5


@pytest.mark.parametrize("bad", ["<|nope|>", 49152, -1])
def test_a_bad_separator_is_named(recipe, tokenizer, bad):
    with pytest.raises(DataError, match=r"data\.doc_separator"):
        separator_id(recipe.data.model_copy(update={"doc_separator": bad}), tokenizer, eos_id=2)


def test_fresh_weights_use_the_init_std_and_it_is_written_as_initializer_range(make_config, tmp_path):
    std = PUBLISHED["init_std"]
    cfg = make_config(f"model_overrides.init_std={std}", "max_steps=1", "checkpoint_every=1")
    source = resolve_model_source(cfg)
    model = build_model(source, seed=0)
    n_layer = model.config.n_layer
    assert model.tok_embeddings.weight.std().item() == pytest.approx(std, rel=0.01)
    wqkv = torch.cat([layer.attention.wqkv.weight.flatten() for layer in model.layers])
    assert wqkv.std().item() == pytest.approx(std, rel=0.05)
    # Residual projections keep nanotron's scaling: std / sqrt(2 * n_layer).
    w2 = torch.cat([layer.feed_forward.w2.weight.flatten() for layer in model.layers])
    assert w2.std().item() == pytest.approx(std / math.sqrt(2 * n_layer), rel=0.05)
    run(prepare(cfg), tmp_path / "out")
    hf = json.loads((tmp_path / "out" / "step-000001" / "config.json").read_text())
    assert hf["initializer_range"] == std
    assert load_model(tmp_path / "out" / "step-000001").config.init_std == std


def test_the_cli_refuses_the_stdlib_corpus_before_any_work(run_cli, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(["--config", str(RECIPE), "--out", str(out)], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error: data.sources: the smollm2-135m recipe needs real pretraining data" in proc.stderr
    assert not out.exists()


def test_the_long_context_stage_refuses_the_stdlib_corpus():
    with pytest.raises(ConfigError, match=r"^data\.sources: this recipe needs real pretraining data"):
        load_config(LONG_CONTEXT)


def test_the_long_context_config_matches_the_released_config_and_continues_stage_1():
    cfg = load_config(LONG_CONTEXT, [REAL_DATA])
    assert cfg.init_from != "scratch" and cfg.model_overrides.changes() == {
        "rope_theta": PUBLISHED_LONG_CONTEXT["rope_theta"],
        "block_size": PUBLISHED_LONG_CONTEXT["max_position_embeddings"],
    }
    assert cfg.data.seq_len == PUBLISHED_LONG_CONTEXT["max_position_embeddings"]
    assert cfg.data.doc_separator == PUBLISHED["document_separator"]
    assert cfg.tokens_per_step == load_config(RECIPE, [REAL_DATA]).tokens_per_step
    # It continues stage 1's linear decay: its peak is the lr stage 1 has at the step it branches from.
    stage1 = load_config(RECIPE, [REAL_DATA])
    branch = stage1.max_steps - cfg.max_steps
    assert cfg.init_from.endswith(f"step-{branch:06d}") and branch % stage1.checkpoint_every == 0
    assert cfg.optim.lr == pytest.approx(lr_at(branch, stage1.optim, stage1.max_steps), rel=1e-3)
    assert (cfg.optim.schedule, cfg.optim.decay_fraction, cfg.optim.min_lr) == ("wsd", 1.0, 0.0)


@pytest.fixture
def stage1_checkpoint(make_config, tmp_path) -> Path:
    """A tiny stage-1 run (RoPE theta 10000, block size 256): its last checkpoint."""
    out = tmp_path / "stage1"
    run(prepare(make_config("max_steps=2", "checkpoint_every=2")), out)
    return out / "step-000002"


def test_the_long_context_stage_continues_a_checkpoint_with_the_new_theta(stage1_checkpoint, base_raw, tmp_path):
    theta, block = PUBLISHED_LONG_CONTEXT["rope_theta"], PUBLISHED_LONG_CONTEXT["max_position_embeddings"]
    data = base_raw["data"]
    # The shipped stage on a tiny model: everything but the model, data and size of the run as shipped.
    cfg = load_config(
        LONG_CONTEXT,
        [
            f"init_from={stage1_checkpoint}",
            f"data.sources=[{data['sources'][0]}]",
            f"data.cache_dir={data['cache_dir']}",
            "data.seq_len=64",
            "data.val_fraction=0",
            "batch_size=2",
            "grad_accum=1",
            "max_steps=2",
            "checkpoint_every=2",
            "optim.warmup_steps=1",
            "eval_every=0",
            "sample_every=0",
            "dtype=float32",
            "device=cpu",
            "peak_tflops=1.0",
            "plot=false",
        ],
    )
    before = load_model(stage1_checkpoint)
    assert (before.config.rope_theta, before.config.block_size) == (10000.0, 256)
    source = resolve_model_source(cfg)
    assert source.config == before.config.replace(rope_theta=theta, block_size=block)
    model = build_model(source, seed=0)
    for name, tensor in before.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    cos, sin = precompute_rope(model.config.head_dim, block, theta)
    torch.testing.assert_close(model.rope_cos, cos, rtol=0, atol=0)
    torch.testing.assert_close(model.rope_sin, sin, rtol=0, atol=0)
    ids = torch.arange(1, 65).unsqueeze(0)
    with torch.no_grad():  # the theta reaches the forward: the same weights, other logits
        assert not torch.allclose(model(ids), before(ids))

    out = tmp_path / "stage2"
    assert run(prepare(cfg), out).final_step == 2
    hf = json.loads((out / "step-000002" / "config.json").read_text())
    assert (hf["rope_theta"], hf["max_position_embeddings"]) == (theta, block)
    resumed = ModelConfig.from_hf_dict(hf)
    assert (resumed.rope_theta, resumed.block_size) == (theta, block)


def test_model_overrides_are_validated(make_config, stage1_checkpoint):
    with pytest.raises(ConfigError, match=r"model_overrides\.n_layer: unknown key"):
        make_config("model_overrides.n_layer=4")
    with pytest.raises(ConfigError, match=r"model_overrides\.rope_theta"):
        make_config("model_overrides.rope_theta=0")
    with pytest.raises(ConfigError, match=r"model_overrides\.init_std: only applies to init_from: scratch"):
        resolve_model_source(make_config(f"init_from={stage1_checkpoint}", "model_overrides.init_std=0.01"))
    with pytest.raises(ConfigError, match=r"data\.seq_len=64 exceeds the model's block size 32"):
        resolve_model_source(make_config("data.seq_len=64", "model_overrides.block_size=32"))
