"""Import a llama.cpp GGUF file: hyper-parameters, dequantized weights (Hugging Face names) and tokenizer, and
write them as a Hugging Face checkpoint directory."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import atomic_directory, from_hf_state_dict, write_model_files
from model.config import ModelConfig


class GGUFError(ValueError):
    """The GGUF file cannot be imported; the message names the file."""


_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _reader(path: str | os.PathLike[str]):
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: GGUF file not found")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises bare ValueError/struct errors on garbage
        raise GGUFError(f"{path}: not a readable GGUF file: {e}") from e


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, path: str = "") -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    n_embd = int(_field(reader, "llama.embedding_length"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens.data) if tokens else None)
    if vocab is None:
        raise ValueError("GGUF file has neither llama.vocab_size nor a token list")
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=int(vocab),
        block_size=int(_field(reader, "llama.context_length", 2048)),
        n_layer=int(_field(reader, "llama.block_count")),
        n_head=n_head,
        n_kv_head=int(_field(reader, "llama.attention.head_count_kv", n_head)),
        n_embd=n_embd,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        # GGUF stores eps as float32; round back to the decimal the model was published with.
        norm_eps=float(f"{float(_field(reader, 'llama.attention.layer_norm_rms_epsilon', 1e-5)):.6g}"),
        tie_embeddings="output.weight" not in names,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time row permutation of the Q/K projections (interleaved rotary pairs back
    to Hugging Face's rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and fp32 weights under Hugging Face Llama names (Q4_0/Q4_1/Q8_0/F16/F32 and every other
    type the `gguf` package dequantizes)."""
    from gguf.quants import dequantize

    reader = _reader(path)
    config = config_from_gguf(reader, str(path))
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        kind = None
        if m:
            kind = _LAYER_NAMES.get(m.group(2))
            name = f"model.layers.{m.group(1)}.{kind}.weight" if kind else None
        else:
            base = t.name.removesuffix(".weight")
            name = f"{_GLOBAL_NAMES[base]}.weight" if base in _GLOBAL_NAMES and t.name.endswith(".weight") else None
        if name is None:
            continue  # e.g. rope_freqs: derived from the config here
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise GGUFError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be dequantized"
            ) from e
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims fastest-first
        if kind == "self_attn.q_proj":
            w = _unpermute(w, config.n_head)
        elif kind == "self_attn.k_proj":
            w = _unpermute(w, config.n_kv_head)
        tensors[name] = torch.from_numpy(np.array(w, order="C", copy=True))
    return config, tensors


def tokenizer_from_gguf(path: str | os.PathLike[str]):
    """A Hugging Face fast tokenizer (with the chat template) built from the GGUF metadata by transformers."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise GGUFError(f"{path}: cannot build a tokenizer from its metadata: {e}") from e


def convert_gguf(
    gguf_path: str | os.PathLike[str], out: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> Path:
    """Dequantize `gguf_path` into an atomic Hugging Face checkpoint directory `out` (weights stored in `dtype`)."""
    config, tensors = read_gguf(gguf_path)
    model = from_hf_state_dict(config, tensors, torch.float32, source=str(gguf_path))
    tokenizer = tokenizer_from_gguf(gguf_path)
    return atomic_directory(out, lambda tmp: write_model_files(tmp, model, tokenizer, dtype))
