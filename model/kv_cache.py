"""A preallocated key/value cache for a batch of sequences that sit at different positions.

The cache holds `max_slots` independent sequences of up to `max_len` positions. A sequence owns one slot
from its prompt pass until it finishes; the slot is then handed to the next sequence without clearing,
because attention only ever reads positions that the current owner has written (see `CacheBatch.mask`).
Keys and values are stored once per key/value head: grouped-query attention is never expanded to
`n_head` copies here. They may be stored in another dtype than the model computes in (`kv_cache_dtype`): an fp16
cache under an fp32 model holds half the bytes, and attention, which at many streams mostly reads the cache, reads
half as much (llama.cpp's default cache type is fp16 too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from model.device import DTYPES

# The dtypes a cache may store (model.device's table), in the order settings and messages name them.
KV_CACHE_DTYPES: dict[str, torch.dtype] = {name: DTYPES[name] for name in ("float32", "float16", "bfloat16")}
KV_CACHE_DTYPE_CHOICES = ("auto", *KV_CACHE_DTYPES)


def resolve_kv_dtype(setting: str, compute: torch.dtype, quantized: bool) -> torch.dtype:
    """The KV cache's dtype for `setting` under a model computing in `compute`. `auto` is fp16 under an fp32 model
    with quantized weights, which already trade exact fp32 numbers for speed (the cache then takes half the memory,
    and attention at 64 streams, mostly cache reads, half the time); anywhere else the compute dtype, so that an
    unquantized model's tokens stay exactly its own."""
    if setting == "auto":
        return torch.float16 if quantized and compute == torch.float32 else compute
    try:
        return KV_CACHE_DTYPES[setting]
    except KeyError:
        raise ValueError(
            f"kv_cache_dtype: expected one of {', '.join(KV_CACHE_DTYPE_CHOICES)}, got {setting!r}"
        ) from None


class KVCache(nn.Module):
    k: torch.Tensor  # (n_layer, max_slots, n_kv_head, max_len, head_dim), registered as buffers below
    v: torch.Tensor

    def __init__(
        self,
        n_layer: int,
        max_slots: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        n_rep: int = 1,
    ) -> None:
        super().__init__()
        if max_slots <= 0 or max_len <= 0:
            raise ValueError(f"KV cache needs max_slots > 0 and max_len > 0, got {max_slots}, {max_len}")
        self.max_slots = max_slots
        self.max_len = max_len
        self.n_rep = n_rep  # query heads per key/value head of the model the cache serves (the mask's layout)
        shape = (n_layer, max_slots, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self._scratch: torch.Tensor | None = None

    def scratch(self, floats: int) -> torch.Tensor:
        """An fp32 work buffer of at least `floats` elements on the cache's device, kept between calls: the native
        decode layers (model/native.py) work in it, so a step does not allocate (and page-fault) megabytes per layer.
        Whoever runs the model on this cache owns it for the call; one step at a time."""
        if self._scratch is None or self._scratch.numel() < floats:
            with torch.inference_mode(False):
                self._scratch = torch.empty(floats, device=self.k.device)
        return self._scratch

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @staticmethod
    def bytes_per_token(n_layer: int, n_kv_head: int, head_dim: int, dtype: torch.dtype) -> int:
        """Memory one cached position costs, for sizing a cache from a byte budget."""
        return 2 * n_layer * n_kv_head * head_dim * torch.empty((), dtype=dtype).element_size()

    def copy_positions(self, src_slot: int, dst_slots: Sequence[int], length: int) -> None:
        """Copy the keys and values at positions 0..length-1 of `src_slot` into each of `dst_slots`, every layer at
        once (a prompt prefilled once and shared by several sequences)."""
        slots = [src_slot, *dst_slots]
        if any(not 0 <= s < self.max_slots for s in slots):
            raise ValueError(f"slots {slots} outside the KV cache's {self.max_slots} slots")
        if not 0 <= length <= self.max_len:
            raise ValueError(f"length {length} outside the KV cache's max_len {self.max_len}")
        if not dst_slots or length == 0:
            return
        dst = torch.tensor(list(dst_slots), dtype=torch.long, device=self.k.device)
        for cache in (self.k, self.v):
            # (n_layer, n_dst, n_kv_head, length, head_dim) in one indexed write, no loop over layers.
            src = cache[:, src_slot : src_slot + 1, :, :length]
            cache[:, dst, :, :length] = src.expand(-1, len(dst_slots), -1, -1, -1)

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
        if torch.compiler.is_compiling():
            # Under torch.compile a write through a view is functionalized into a copy of the whole layer and a
            # copy back (inductor's code for the decode step copied every layer's cache each step); an index_put_
            # on the buffer itself is lowered to an in-place scatter of the rows written.
            n_kv_head = self.k.shape[2]
            slot_head, pos = flat_index.div(self.max_len, rounding_mode="floor"), flat_index.remainder(self.max_len)
            slot, head = slot_head.div(n_kv_head, rounding_mode="floor"), slot_head.remainder(n_kv_head)
            index = (torch.full_like(pos, layer), slot, head, pos)
            self.k.index_put_(index, k.reshape(-1, head_dim).to(self.k.dtype))
            self.v.index_put_(index, v.reshape(-1, head_dim).to(self.v.dtype))
            return self.k[layer], self.v[layer]
        # Row-wise index_copy_ on a flat view: ~3x faster than advanced indexing around the head dimension.
        # A cache kept in another dtype than the model computes in (fp16 under an fp32 model) rounds them here, once.
        k_layer.view(-1, head_dim).index_copy_(0, flat_index, k.reshape(-1, head_dim).to(k_layer.dtype))
        v_layer.view(-1, head_dim).index_copy_(0, flat_index, v.reshape(-1, head_dim).to(v_layer.dtype))
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


Positions = torch.Tensor | Sequence[Sequence[int]]


def _positions(positions: Positions, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """(positions as a long tensor, smallest, largest). Host-side ints cost no device sync; a tensor costs one."""
    if isinstance(positions, torch.Tensor):
        if positions.numel() == 0:
            raise ValueError("positions: empty batch")
        low, high = torch.aminmax(positions)
        return positions.to(device=device, dtype=torch.long), int(low), int(high)  # host sync
    rows = [list(r) for r in positions]
    flat = [p for r in rows for p in r]
    if not flat:
        raise ValueError("positions: empty batch")
    return torch.tensor(rows, dtype=torch.long, device=device), min(flat), max(flat)


def _check_range(low: int, high: int, cache: KVCache) -> None:
    # A position outside [0, max_len) would index another slot's rows of the flat cache view: refuse it.
    if low < 0:
        raise ValueError(f"position {low} is negative")
    if high >= cache.max_len:
        raise ValueError(f"position {high} is beyond the KV cache's max_len {cache.max_len}")


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
    """Everything a forward pass over the cache needs, built once by the caller and shared by all layers: where
    each token reads and writes the cache, its attention mask, and which positions produce logits.

    Either one sequence per row (`build`: decode steps, and prompts padded to a common length), or one row with
    several sequences packed back to back (`build_packed`: prompts with no padding between them), each attending
    only to its own slot. Both refuse positions outside the cache, so a write never lands in another slot.
    """

    cache: KVCache
    positions: torch.Tensor  # (B, T) absolute position of each input token
    flat_index: torch.Tensor  # (B * T * n_kv_head,) row of each written key in a layer's (-1, head_dim) view
    slot_index: slice | torch.Tensor | None  # the batch's slots: a slice (a view, no copy) when contiguous
    kv_len: int  # keys attended: max position in the batch + 1
    mask: torch.Tensor | None  # (B, 1, n_rep * T, kv_len) bool, True where a query may attend a key
    segments: list[Segment] | None = None  # packed rows only
    slots: torch.Tensor | None = None  # long: rows (B,) each row's slot; packed (N,) each token's slot
    # Rows only: (B,) one position per row, logits (B, vocab). Packed: (S,) positions in the row, logits (S, vocab).
    # None: logits for every position, (B, T, vocab).
    logits_index: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        cache: KVCache,
        slots: Sequence[int] | torch.Tensor,
        positions: Positions,
        kv_len: int | None = None,
        logits_index: torch.Tensor | Sequence[int] | None = None,
    ) -> CacheBatch:
        """Row b is the sequence in cache slot `slots[b]`, its tokens at `positions[b]` (B, T).

        Pass positions as host-side ints on a hot path: a tensor costs a host sync to check its range.
        `kv_len` (default: the furthest position + 1) may be larger, to keep kernel shapes stable; it is checked
        against the positions and the cache.
        """
        device = cache.k.device
        pos, low, high = _positions(positions, device)
        _check_range(low, high, cache)
        if kv_len is None:
            kv_len = high + 1
        elif not high < kv_len <= cache.max_len:
            raise ValueError(
                f"kv_len {kv_len} must cover position {high} and fit the KV cache's max_len {cache.max_len}"
            )
        if isinstance(slots, torch.Tensor):
            slot_ids = slots.to(device=device, dtype=torch.long)
            slot_index: slice | torch.Tensor = slot_ids
        else:
            slot_list = list(slots)
            if any(not 0 <= s < cache.max_slots for s in slot_list):
                raise ValueError(f"slots {slot_list} outside the KV cache's {cache.max_slots} slots")
            slot_ids = torch.tensor(slot_list, dtype=torch.long, device=device)
            start = slot_list[0] if slot_list else 0
            contiguous = slot_list == list(range(start, start + len(slot_list)))
            slot_index = slice(start, start + len(slot_list)) if contiguous else slot_ids
        if slot_ids.shape[0] != pos.shape[0]:
            raise ValueError(f"{slot_ids.shape[0]} slots for {pos.shape[0]} rows of positions")
        return cls(
            cache=cache,
            positions=pos,
            flat_index=_flat_index(slot_ids.view(-1, 1), pos, cache),
            slot_index=slot_index,
            kv_len=kv_len,
            mask=_attend_mask(pos, kv_len, cache.n_rep),
            slots=slot_ids,
            logits_index=_index(logits_index, device),
        )

    @classmethod
    def decode(cls, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor, kv_len: int) -> CacheBatch:
        """One token per row from tensors already on the cache's device: row b writes and reads slot `slots[b]`
        (B,) at position `positions[b, 0]` (B, 1), attending keys 0..kv_len-1 (masked beyond its position).

        Nothing is checked and nothing leaves the device, so this traces into a compiled graph (torch.compile):
        the caller guarantees 0 <= position < kv_len <= cache.max_len and valid slots, as `build` would check."""
        return cls(
            cache=cache,
            positions=positions,
            flat_index=_flat_index(slots.view(-1, 1), positions, cache),
            slot_index=slots,
            kv_len=kv_len,
            mask=_attend_mask(positions, kv_len, cache.n_rep),
            slots=slots,
        )

    @classmethod
    def build_packed(
        cls,
        cache: KVCache,
        segments: Sequence[tuple[int, int, int]],
        positions: Sequence[int] | torch.Tensor,
        logits_index: torch.Tensor | Sequence[int] | None = None,
    ) -> CacheBatch:
        """One row holding several sequences back to back: `segments` gives (slot, length, kv_len) of each in row
        order, lengths summing to N; `positions` (N,) their absolute positions (host-side ints cost no sync; a
        tensor may also be (1, N)). `logits_index` (S,) picks positions in the row."""
        device = cache.k.device
        host: list[int] | None = None
        if isinstance(positions, torch.Tensor):
            pos, low, high = _positions(positions.reshape(1, -1), device)
        else:
            host = list(positions)
            pos, low, high = _positions([host], device)
        _check_range(low, high, cache)
        row = pos[0]
        spans: list[Segment] = []
        start = 0
        for slot, length, kv_len in segments:
            if length < 1:
                raise ValueError(f"segment of slot {slot} is empty")
            if not 0 <= slot < cache.max_slots:
                raise ValueError(f"slot {slot} outside the KV cache's {cache.max_slots} slots")
            if kv_len > cache.max_len:
                raise ValueError(f"kv_len {kv_len} is beyond the KV cache's max_len {cache.max_len}")
            if host is not None and max(host[start : start + length], default=0) >= kv_len:
                raise ValueError(f"kv_len {kv_len} of slot {slot} does not cover its positions")
            mask = _attend_mask(row[start : start + length], kv_len, cache.n_rep).unsqueeze(0)
            spans.append(Segment(slot, start, start + length, kv_len, mask))
            start += length
        if start != row.numel():
            raise ValueError(f"segments cover {start} tokens, the row has {row.numel()}")
        lengths = torch.tensor([length for _, length, _ in segments], device=device)
        token_slots = torch.tensor([slot for slot, _, _ in segments], device=device).repeat_interleave(lengths)
        return cls(
            cache=cache,
            positions=pos,
            flat_index=_flat_index(token_slots, row, cache),
            slot_index=None,
            kv_len=max(kv_len for _, _, kv_len in segments),
            mask=None,
            segments=spans,
            slots=token_slots,
            logits_index=_index(logits_index, device),
        )


def _index(index: torch.Tensor | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    if index is None or isinstance(index, torch.Tensor):
        return index
    return torch.tensor(list(index), dtype=torch.long, device=device)
