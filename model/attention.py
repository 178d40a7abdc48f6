"""Grouped-query self-attention with rotary embeddings and an optional KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import native
from model.config import ModelConfig
from model.kv_cache import CacheBatch
from model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.n_rep = config.n_rep
        # q, k and v projections fused into one matmul; checkpoints keep them separate (see checkpoint.py).
        self.wqkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: CacheBatch | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, n_embd). With `batch`, keys and values go to its cache and queries attend there; without,
        attention runs over x itself: causal, or under `mask` (B, 1, T, T) bool when given."""
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        qkv = self.wqkv(x)
        rows = native.token_rows(batch, x) if batch is not None and batch.segments is None else None
        if batch is not None and rows is not None:
            # Decode rows in one native call: rotary embedding, cache write and attention (model/native.py).
            y = native.attention_decode(
                qkv.view(B, -1),
                self.n_head,
                self.n_kv_head,
                cos.reshape(B, self.head_dim),
                sin.reshape(B, self.head_dim),
                batch.cache.k[self.layer_idx],
                batch.cache.v[self.layer_idx],
                *rows,
                batch.kv_len,
            )
            return self.wo(y.view(B, T, q_size))
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim), cos, sin)
        v = v.view(B, T, self.n_kv_head, self.head_dim)

        if batch is None:
            # Training / full-sequence pass over the input itself; the plain causal case keeps SDPA's fast path.
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=True,
            )  # (B, n_head, T, head_dim)
            y = y.transpose(1, 2)
        elif batch.segments is None:
            assert batch.mask is not None  # a row batch always has one
            keys, values = batch.cache.update(self.layer_idx, batch, k, v)  # (B, n_kv_head, kv_len, head_dim)
            y = self._cached_attention(q, keys, values, batch.mask)
        else:
            # A packed row: each sequence attends to its own slot only.
            k_all, v_all = batch.cache.write(self.layer_idx, batch.flat_index, k, v)
            y = torch.cat(
                [
                    self._cached_attention(
                        q[:, s.start : s.end],
                        k_all[s.slot : s.slot + 1, :, : s.kv_len],
                        v_all[s.slot : s.slot + 1, :, : s.kv_len],
                        s.mask,
                    )
                    for s in batch.segments
                ],
                dim=1,
            )
        return self.wo(y.reshape(B, T, q_size))

    def _cached_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """q (B, T, n_head, head_dim) against cached keys/values (B, n_kv_head, kv_len, head_dim) under a bool
        mask (B, 1, n_rep * T, kv_len); returns (B, T, n_head, head_dim)."""
        B, T = q.shape[:2]
        # Fold the query heads that share a key/value head into the query length, so attention reads each
        # cached key/value head once instead of n_rep expanded copies.
        q = q.permute(0, 2, 1, 3).reshape(B, self.n_kv_head, self.n_rep * T, self.head_dim)
        # A cache stored in another dtype (fp16 under an fp32 model) is widened for the product: exact.
        y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask)
        return y.view(B, self.n_head, T, self.head_dim).transpose(1, 2)
