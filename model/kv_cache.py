"""A preallocated key/value cache for a batch of sequences that sit at different positions.

The cache holds `max_slots` independent sequences of up to `max_len` positions. A sequence owns one slot
from its prompt pass until it finishes; the slot is then handed to the next sequence without clearing,
because attention only ever reads positions that the current owner has written (see `CacheBatch.mask`).
Keys and values are stored once per key/value head: grouped-query attention is never expanded to
`n_head` copies here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(
        self,
        n_layer: int,
        max_slots: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if max_slots <= 0 or max_len <= 0:
            raise ValueError(f"KV cache needs max_slots > 0 and max_len > 0, got {max_slots}, {max_len}")
        self.max_slots = max_slots
        self.max_len = max_len
        shape = (n_layer, max_slots, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @staticmethod
    def bytes_per_token(n_layer: int, n_kv_head: int, head_dim: int, dtype: torch.dtype) -> int:
        """Memory one cached position costs, for sizing a cache from a byte budget."""
        return 2 * n_layer * n_kv_head * head_dim * torch.empty((), dtype=dtype).element_size()

    def update(
        self, layer: int, batch: CacheBatch, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, n_kv_head, head_dim) at the batch's positions; return the batch's keys and
        values (B, n_kv_head, kv_len, head_dim), a view when the slots are contiguous."""
        k_layer, v_layer = self.write(layer, batch.flat_index, k, v)
        return (
            k_layer[batch.slot_index, :, : batch.kv_len],
            v_layer[batch.slot_index, :, : batch.kv_len],
        )

    def write(
        self, layer: int, flat_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (..., n_kv_head, head_dim) at rows `flat_index` of the layer; return the whole layer's
        keys and values (max_slots, n_kv_head, max_len, head_dim)."""
        k_layer, v_layer = self.k[layer], self.v[layer]
        head_dim = k.shape[-1]
        # Row-wise index_copy_ on a flat view: ~3x faster than advanced indexing around the head dimension.
        k_layer.view(-1, head_dim).index_copy_(0, flat_index, k.reshape(-1, head_dim))
        v_layer.view(-1, head_dim).index_copy_(0, flat_index, v.reshape(-1, head_dim))
        return k_layer, v_layer


def _flat_index(slots: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Row of (slot, head, position) in a layer's cache viewed as (max_slots * n_kv_head * max_len, head_dim), for
    every token and head: slots broadcast against positions (..., T), result (..., T, n_kv_head) flattened."""
    n_kv_head = cache.k.shape[2]
    heads = torch.arange(n_kv_head, device=positions.device)
    return ((slots.unsqueeze(-1) * n_kv_head + heads) * cache.max_len + positions.unsqueeze(-1)).reshape(-1)


def _attend_mask(query_pos: torch.Tensor, kv_len: int, n_rep: int) -> torch.Tensor:
    """(..., 1, n_rep * T, kv_len) bool from query positions (..., T): a query sees exactly the keys its own
    sequence wrote before or at its position. Rows are ordered (rep, T) like the grouped queries."""
    key_pos = torch.arange(kv_len, device=query_pos.device)
    mask = key_pos <= query_pos.unsqueeze(-1)  # (..., T, kv_len)
    return mask.unsqueeze(-3).repeat_interleave(n_rep, dim=-3).flatten(-3, -2).unsqueeze(-3)


@dataclass(frozen=True)
class Segment:
    """One sequence's tokens inside a packed row: row[start:end] belongs to cache slot `slot`."""

    slot: int
    start: int
    end: int
    kv_len: int  # keys this sequence attends: its furthest position + 1, or more (masked)
    mask: torch.Tensor  # (1, 1, n_rep * (end - start), kv_len) bool


@dataclass
class CacheBatch:
    """Where a forward pass reads and writes the cache; built once per forward, shared by all layers.

    Either one sequence per row (`build`: decode steps, and prompts padded to a common length), or one row with
    several sequences packed back to back (`build_packed`: prompts with no padding between them), each attending
    only to its own slot.
    """

    positions: torch.Tensor  # (B, T) absolute position of each input token
    flat_index: torch.Tensor  # (B * T * n_kv_head,) row of each written key in a layer's (-1, head_dim) view
    slot_index: slice | torch.Tensor | None  # the batch's slots: a slice (a view, no copy) when contiguous
    kv_len: int  # keys attended: max position in the batch + 1
    mask: torch.Tensor | None  # (B, 1, n_rep * T, kv_len) bool, True where a query may attend a key
    segments: list[Segment] | None = None  # packed rows only

    @classmethod
    def build(
        cls,
        positions: torch.Tensor,
        slots: Sequence[int] | torch.Tensor,
        cache: KVCache,
        n_rep: int,
        kv_len: int | None = None,
    ) -> CacheBatch:
        device = positions.device
        if isinstance(slots, torch.Tensor):
            slot_ids = slots.to(device=device, dtype=torch.long)
            slot_index: slice | torch.Tensor = slot_ids
        else:
            slot_list = list(slots)
            slot_ids = torch.tensor(slot_list, dtype=torch.long, device=device)
            start = slot_list[0] if slot_list else 0
            contiguous = slot_list == list(range(start, start + len(slot_list)))
            slot_index = slice(start, start + len(slot_list)) if contiguous else slot_ids
        if kv_len is None:
            kv_len = int(positions.max()) + 1  # host sync; callers that know it pass kv_len
        if kv_len > cache.max_len:
            raise ValueError(f"position {kv_len - 1} is beyond the KV cache's max_len {cache.max_len}")
        return cls(
            positions=positions,
            flat_index=_flat_index(slot_ids.view(-1, 1), positions, cache),
            slot_index=slot_index,
            kv_len=kv_len,
            mask=_attend_mask(positions, kv_len, n_rep),
        )

    @classmethod
    def build_packed(
        cls,
        positions: torch.Tensor,
        segments: Sequence[tuple[int, int, int]],
        cache: KVCache,
        n_rep: int,
    ) -> CacheBatch:
        """One row (1, N) holding several sequences back to back: `segments` gives (slot, length, kv_len) of each
        in row order, lengths summing to N; `positions` (1, N) their absolute positions."""
        row = positions[0]
        spans, start = [], 0
        for slot, length, kv_len in segments:
            if length < 1:
                raise ValueError(f"segment of slot {slot} is empty")
            if kv_len > cache.max_len:
                raise ValueError(f"kv_len {kv_len} is beyond the KV cache's max_len {cache.max_len}")
            mask = _attend_mask(row[start : start + length], kv_len, n_rep).unsqueeze(0)
            spans.append(Segment(slot, start, start + length, kv_len, mask))
            start += length
        if start != row.numel():
            raise ValueError(f"segments cover {start} tokens, the row has {row.numel()}")
        lengths = torch.tensor([length for _, length, _ in segments], device=row.device)
        token_slots = torch.tensor([slot for slot, _, _ in segments], device=row.device).repeat_interleave(lengths)
        return cls(
            positions=positions,
            flat_index=_flat_index(token_slots, row, cache),
            slot_index=None,
            kv_len=max(kv_len for _, _, kv_len in segments),
            mask=None,
            segments=spans,
        )
