"""Our model against transformers' LlamaForCausalLM on the same checkpoint directory."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from model.checkpoint import load_model


def test_tiny_logits_match_transformers(tiny_checkpoint):
    ours = load_model(tiny_checkpoint)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    assert isinstance(theirs, LlamaForCausalLM)
    idx = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(idx) - theirs(idx).logits).abs().max().item()
    assert diff <= 1e-4


def test_checkpoint_directory_is_a_hugging_face_directory(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (tiny_checkpoint / "generation_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert tok.decode(tok.encode("Hello world", add_special_tokens=False)) == "Hello world"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_any_local_hf_llama_directory_loads(tmp_path):
    """The reverse direction: a directory written by transformers itself (untied head, other shapes)."""
    hf_cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rope_theta=5000.0,
    )
    torch.manual_seed(3)
    theirs = LlamaForCausalLM(hf_cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert not ours.config.tie_embeddings and ours.config.n_kv_head == 2
    idx = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4
