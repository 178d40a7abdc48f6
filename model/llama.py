"""The SmolLM2 transformer: a pre-norm LLaMA-style decoder with tied embeddings and no biases."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import Attention
from model.config import ModelConfig
from model.kv_cache import CacheBatch, KVCache
from model.rope import precompute_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Hugging Face does, so bf16 results match theirs.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        # gate and up projections fused into one matmul; checkpoints keep them separate.
        self.w13 = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, kv_cache=None, batch=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, kv_cache, batch)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.output = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = precompute_rope(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int | None = None) -> None:
        """Training from scratch: normal(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen).to(p.dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def new_kv_cache(self, max_slots: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        max_len = min(max_len or c.block_size, c.block_size)
        return KVCache(c.n_layer, max_slots, max_len, c.n_kv_head, c.head_dim, dtype or self.dtype, self.device)

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        slots: Sequence[int] | torch.Tensor | None = None,
        kv_len: int | None = None,
        logits_index: torch.Tensor | None = None,
        segments: Sequence[tuple[int, int, int]] | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32 for token ids `idx` (B, T).

        Without a cache this is the training pass over positions 0..T-1. With `kv_cache`, row b of the batch
        is the sequence in cache slot `slots[b]` and its tokens sit at `input_pos[b]` (B, T); their keys and
        values are written to the cache and attention reads everything the slot holds up to each position.
        `logits_index` (B,) keeps only one position per row (the last prompt token in a prefill), giving
        logits (B, vocab) and skipping the output projection everywhere else.

        Packed prefill: with `segments`, `idx` is a single row (1, N) holding several sequences back to back,
        segments[i] = (slot, length, kv_len) in row order, and `logits_index` (S,) picks positions in that row,
        giving logits (S, vocab). Nothing is padded between sequences.
        """
        B, T = idx.shape
        if input_pos is None:
            if kv_cache is not None:
                raise ValueError("input_pos is required with a KV cache")
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            input_pos = torch.arange(T, device=idx.device).unsqueeze(0).expand(B, T)
        batch = None
        if segments is not None:
            if kv_cache is None or B != 1:
                raise ValueError("segments need a KV cache and a single packed row")
            batch = CacheBatch.build_packed(input_pos, segments, kv_cache, self.config.n_rep)
        elif kv_cache is not None:
            if slots is None:
                slots = range(B)
            batch = CacheBatch.build(input_pos, slots, kv_cache, self.config.n_rep, kv_len)
        x = self.tok_embeddings(idx)
        cos = self.rope_cos[input_pos].to(x.dtype).unsqueeze(2)  # (B, T, 1, head_dim)
        sin = self.rope_sin[input_pos].to(x.dtype).unsqueeze(2)
        for layer in self.layers:
            x = layer(x, cos, sin, kv_cache, batch)
        if logits_index is not None and segments is not None:
            x = x[0, logits_index]  # (S, n_embd)
        elif logits_index is not None:
            x = x[torch.arange(B, device=x.device), logits_index]  # (B, n_embd)
        return self.output(self.norm(x)).float()
