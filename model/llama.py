"""The SmolLM2 transformer: a pre-norm LLaMA-style decoder with tied embeddings and no biases."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model import native
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
        if native.usable(x, self.weight):
            return native.rms_norm(x.contiguous(), self.weight, self.eps)  # one call instead of seven ops
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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: CacheBatch | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, batch, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    rope_cos: torch.Tensor  # (block_size, head_dim), registered as buffers below
    rope_sin: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Built on the meta device (a shape to be given a checkpoint's tensors), nothing is computed: an op on meta
        # tensors (the embedding's default init, the rotary tables) goes through torch._refs, which imports
        # torch._dynamo, ~2 s of every server start. Anywhere else the model is initialised as usual.
        on_meta = torch.empty(0).device.type == "meta"
        meta_weight = torch.empty(config.vocab_size, config.n_embd) if on_meta else None
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd, _weight=meta_weight)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.output = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if on_meta:
            cos = sin = torch.empty(config.block_size, config.head_dim)
        else:
            cos, sin = precompute_rope(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int | None = None) -> None:
        """Training from scratch: normal(0, config.init_std), the residual projections (attention output, MLP
        down) scaled by 1/sqrt(2 * n_layer), norms 1. This is nanotron's `StandardParametrizator`, which SmolLM2
        was pretrained with: its `init_method.std` (1/sqrt(576) for 135M) for embeddings and column-parallel
        linears, std / sqrt(2 * num_layers) for the row-parallel ones (o_proj, down_proj)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        base_std = self.config.init_std
        residual_std = base_std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else base_std
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
        return KVCache(
            c.n_layer, max_slots, max_len, c.n_kv_head, c.head_dim, dtype or self.dtype, self.device, n_rep=c.n_rep
        )

    def forward(
        self, idx: torch.Tensor, positions: torch.Tensor | None = None, batch: CacheBatch | None = None
    ) -> torch.Tensor:
        """Logits in fp32 for token ids `idx` (B, T).

        With `batch`, tokens sit where the batch says (its positions, slots and segments, see `CacheBatch`): their
        keys and values are written to the batch's cache and attention reads what each sequence's slot holds.
        Logits are (B, T, vocab), or one row per entry of `batch.logits_index` (the output projection then runs
        only there).

        Without a batch this is the training pass: plain causal attention over positions 0..T-1, or, with
        `positions` (B, T), rotary positions as given and attention kept inside each run of positions: a position
        0 starts a new segment, so several sequences packed in one row never see each other.
        """
        B, T = idx.shape
        mask = None
        if batch is not None:
            if positions is not None and positions is not batch.positions:
                raise ValueError("with a CacheBatch the positions are the batch's; pass positions=None")
            positions = batch.positions
        else:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            if positions is None:
                positions = torch.arange(T, device=idx.device).unsqueeze(0).expand(B, T)
            else:
                mask = segment_mask(positions)
        x = self.tok_embeddings(idx)
        cos = self.rope_cos[positions].to(x.dtype).unsqueeze(2)  # (B, T, 1, head_dim)
        sin = self.rope_sin[positions].to(x.dtype).unsqueeze(2)
        # Decode rows and short prompts of an int4 model on the native kernels: every block in one call
        # (model/native.py).
        rows = native.token_rows(batch, x)
        fused = None
        if rows is not None:
            assert batch is not None  # token_rows checked it
            fused = native.decode_layers(x, self.layers, cos, sin, batch.cache, rows, batch.kv_len)
        if fused is not None:
            x = fused
        else:
            for layer in self.layers:
                x = layer(x, cos, sin, batch, mask)
        if batch is not None and batch.logits_index is not None:
            if batch.segments is not None:
                x = x[0, batch.logits_index]  # (S, n_embd)
            else:
                x = x[torch.arange(B, device=x.device), batch.logits_index]  # (B, n_embd)
        return self.output(self.norm(x)).float()


def segment_mask(positions: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool from positions (B, T): token i attends token j iff j <= i and both belong to the same
    segment, a segment starting at every position 0 (several sequences packed in one row)."""
    T = positions.shape[-1]
    segment = (positions == 0).cumsum(-1)  # (B, T)
    order = torch.arange(T, device=positions.device)
    causal = order.unsqueeze(-1) >= order  # (T, T)
    return ((segment.unsqueeze(-1) == segment.unsqueeze(-2)) & causal).unsqueeze(1)
