"""The decode step under torch.compile (SMOLLM_COMPILE=decode): one static-shape graph per (batch bucket, key
bucket), compiled lazily on first use, and eager again for good if compiling fails.

Why it is built this way:
- Static shapes (`dynamic=False`): a decode batch is padded up to the next batch bucket (1, 2, 4, ... up to the
  slot count) and the keys attended to the next power of two (at least KV_ALIGN, at most the cache), so a
  2048-token, 64-slot server compiles at most 7 x 6 graphs, whatever the traffic.
- Padding rows write their keys into one scratch slot the runner keeps past the scheduler's slots (position 0),
  so they never touch a live sequence; their logits are dropped.
- The KV-cache write stays inside the graph as an `index_put_` on the preallocated buffers (`KVCache.write`
  under compile), which inductor lowers to an in-place scatter of the rows written; on CUDA the buffers are
  marked static so CUDA graphs (mode "reduce-overhead") replay against the same memory instead of copying the
  cache in.
- Lazy, not at start-up: compiling one graph of the 135M model took 4-12 min on the shared, loaded 2-core AVX2
  CPU (2026-11-29, `python -m bench.profile --compile`), so warming every bucket before /readyz would hold a server
  unready for hours there; each first use is logged instead. Prefill stays eager: its shapes vary with every
  prompt.
- Off by default: on that CPU the compiled fp32 step was ~2x slower than the eager one (batch 1 and 16, measured
  interleaved in one process); the win is on CUDA, where the eager step is launch-bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from model.inductor import pin_cpu_simd_width
from model.kv_cache import CacheBatch, KVCache
from model.llama import Transformer

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "decode")


def batch_buckets(max_rows: int) -> list[int]:
    """Padded batch sizes: powers of two below `max_rows`, then `max_rows` itself."""
    buckets, b = [], 1
    while b < max_rows:
        buckets.append(b)
        b *= 2
    return [*buckets, max_rows]


def bucket(n: int, buckets: list[int]) -> int:
    """The smallest bucket holding `n`."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def compile_options(device: torch.device) -> dict[str, Any]:
    """CUDA graphs on CUDA (the step is launch-bound there: 20.5 -> 1.08 ms at batch 1 on an H200, bench/cuda.py);
    inductor's default C++ code generation on the CPU."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return {"mode": mode, "dynamic": False, "fullgraph": True}


class CompiledDecode:
    """A compiled decode step for one model and its KV cache. Call it with the batch's next tokens, slots and
    positions; it returns the logits (B, vocab), or None once compilation has failed (the caller then runs the
    eager step, as it does from then on)."""

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        scratch_slot: int,
        pad_id: int,
        kv_align: int,
        options: dict[str, Any] | None = None,
    ) -> None:
        if not 0 <= scratch_slot < cache.max_slots:
            raise ValueError(f"scratch slot {scratch_slot} outside the KV cache's {cache.max_slots} slots")
        self.model = model
        self.cache = cache
        self.scratch_slot = scratch_slot
        self.pad_id = pad_id
        self.kv_align = kv_align
        self.device = cache.k.device
        self.buckets = batch_buckets(scratch_slot)  # the scheduler's slots are 0..scratch_slot-1
        self.kv_buckets = batch_buckets(-(-cache.max_len // kv_align))  # in units of kv_align
        self.options = compile_options(self.device) if options is None else options
        self.cudagraphs = self.options.get("mode") == "reduce-overhead"
        self.failed = False
        self.seen: set[tuple[int, int]] = set()
        # One graph per (batch bucket, key bucket) of the same function: dynamo's default of 8 recompiles would
        # silently send the rest back to eager.
        graphs = len(self.buckets) * len(self.kv_buckets)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
        # Dynamo keeps compiled graphs per code object, not per instance: an earlier CompiledDecode's graphs (the
        # model before a hot reload, an earlier engine in this process) would count against that limit and, once
        # it is reached, dynamo runs the step eagerly without a word. Only the newest instance decodes, so its
        # predecessors' graphs are dropped.
        torch._dynamo.reset_code(CompiledDecode._forward.__code__)
        if self.cudagraphs:
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
        pin_cpu_simd_width()
        self._step: Callable[..., torch.Tensor] = torch.compile(self._forward, **self.options)

    def _forward(self, idx: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        batch = CacheBatch.decode(self.cache, slots, positions, kv_len)
        return self.model(idx, batch=batch)  # (B, 1, vocab)

    def __call__(self, tokens: list[int], slots: list[int], positions: list[int], kv_len: int) -> torch.Tensor | None:
        """Logits (B, vocab) of one decode step: row b feeds `tokens[b]` at `positions[b]` of slot `slots[b]`,
        attending at least `kv_len` keys. None when compiling failed (now or before): run the eager step."""
        if self.failed:
            return None
        n = len(tokens)
        rows = bucket(n, self.buckets)
        kv = min(bucket(-(-kv_len // self.kv_align), self.kv_buckets) * self.kv_align, self.cache.max_len)
        pad = rows - n
        # One host-to-device copy for the three inputs, (3, rows).
        host = torch.tensor(
            [
                tokens + [self.pad_id] * pad,
                slots + [self.scratch_slot] * pad,
                positions + [0] * pad,
            ],
            dtype=torch.long,
        )
        inputs = host.to(self.device, non_blocking=True)
        if (rows, kv) not in self.seen:
            log.info("compiling the decode step for batch %d, %d keys (first use; SMOLLM_COMPILE=decode)", rows, kv)
        try:
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = self._step(inputs[0].view(-1, 1), inputs[1], inputs[2].view(-1, 1), kv)
        except Exception:  # a compiler bug or a missing toolchain must cost speed, never the server
            log.warning(
                "torch.compile of the decode step failed (batch %d, %d keys); decoding eagerly from now on",
                rows,
                kv,
                exc_info=True,
            )
            self.failed = True
            return None
        self.seen.add((rows, kv))
        out = logits[:n, 0]  # (B, vocab)
        # A CUDA graph's output is overwritten by its next replay: keep a copy.
        return out.clone() if self.cudagraphs else out
