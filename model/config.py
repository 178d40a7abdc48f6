"""Model arguments: a typed config with named presets that map to and from Hugging Face `LlamaConfig`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a LLaMA-style decoder (SmolLM2)."""

    vocab_size: int = 49152
    block_size: int = 2048  # longest sequence the model is trained or served at (max_position_embeddings)
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    n_embd: int = 576
    intermediate_size: int = 1536
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = 2
    init_std: float = 0.02  # std of fresh weights (`Transformer.init_weights`); HF's `initializer_range`

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_head // self.n_kv_head

    def num_params(self, include_embedding: bool = True) -> int:
        d, hd = self.n_embd, self.head_dim
        attn = d * hd * (self.n_head + 2 * self.n_kv_head) + self.n_head * hd * d
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        total = self.n_layer * per_layer + d + head
        return total + (embed if include_embedding else 0)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` of a Hugging Face `LlamaForCausalLM` with these hyper-parameters."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.block_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "hidden_size": self.n_embd,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": self.init_std,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "use_cache": True,
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face Llama `config.json`; refuses features this model does not implement."""
        model_type = hf.get("model_type")
        if model_type not in ("llama", None):
            raise ValueError(f"config.json: model_type {model_type!r} is not supported (only 'llama')")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"config.json: {flag}=true is not supported")
        # transformers < 5 names RoPE variants `rope_scaling`, transformers 5 `rope_parameters` (with rope_theta
        # inside). Only plain RoPE is implemented: loading llama3/yarn/linear/dynamic scaling as plain RoPE would
        # give wrong logits past the original context without any error.
        for key in ("rope_scaling", "rope_parameters"):
            rope = hf.get(key) or {}
            if not isinstance(rope, dict):
                raise ValueError(f"config.json: {key} must be an object, got {rope!r}")
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ValueError(
                    f"config.json: {key} with rope_type {rope_type!r} is not supported (only plain "
                    "RoPE, rope_type 'default')"
                )
            extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
            if extra:
                raise ValueError(f"config.json: {key} keys {extra} are not supported (only plain RoPE)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        n_head = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * n_head != hf["hidden_size"]:
            raise ValueError("config.json: head_dim * num_attention_heads must equal hidden_size")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        eos = hf.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0]
        return cls(
            vocab_size=hf["vocab_size"],
            block_size=hf.get("max_position_embeddings", 2048),
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            n_embd=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            rope_theta=float(rope_theta),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
            init_std=float(hf.get("initializer_range", 0.02)),
        )


PRESETS: dict[str, ModelConfig] = {
    # SmolLM2-135M as it is pretrained from scratch: the `model_config` and `init_method` of the published
    # nanotron config (huggingface/smollm, config_smollm2_135M.yaml). RoPE theta 10000 at 2048 tokens is the main
    # stage; the released checkpoints' rope_theta 100000 and max_position_embeddings 8192 come from a later
    # long-context stage (trainer/configs/smollm2-135m-long-context.yaml) and are read from their config.json.
    # The base model separates documents with <|endoftext|> (id 0), which is its bos and eos; the Instruct
    # checkpoint's 1 and 2 (<|im_start|>, <|im_end|>) come from its chat fine-tuning. init std 1/sqrt(576).
    "smollm2-135m": ModelConfig(
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
        init_std=1 / math.sqrt(576),
    ),
    # A debug flavour for tests and smoke runs: same shape rules (GQA 4:2, tied embeddings), seconds to train.
    "tiny": ModelConfig(
        vocab_size=49152,
        block_size=256,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        intermediate_size=128,
        rope_theta=10000.0,
    ),
}
