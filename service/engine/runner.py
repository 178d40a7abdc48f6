"""Turns a scheduled batch into tensors and runs the model: batched prompt chunks (with the decode rows of a mixed
step) or one batched decode step, then sampling. The runner makes no scheduling decisions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model import native
from model.kv_cache import CacheBatch, KVCache
from model.llama import Transformer
from model.sampling import TokenLogprobs, sample, sample_with_logprobs
from service.engine import prompt_logprobs
from service.engine.compiled_decode import COMPILE_MODES, CompiledDecode
from service.engine.scheduler import Batch, PrefillItem
from service.engine.sequence import Sequence

KV_ALIGN = 64  # a multiple of every CPU kernel's key block size (16 for bf16 here)
# Prompt chunks are padded to a multiple of this many tokens. oneDNN builds and caches kernels per tensor shape,
# so an exact chunk length made every new prompt length a new shape and the resident set grew without bound.
# 16 rather than 32: a prefill of 16 rows costs 145 ms at 16 tokens a row and 214 ms at 32 (bf16, 2 cores), and
# the resident set stayed flat (tests/reliability/test_load.py).
PREFILL_ALIGN = 16


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class RunOutput:
    """A step's sampled tokens, one per batch row (the prefill items, then the decode sequences; None for a prompt
    chunk that does not end its prompt), and when some row asked for them, each row's log-probabilities (else
    None)."""

    tokens: list[int | None]
    logprobs: list[TokenLogprobs | None] | None = None


def sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobs | None] | None]:
    """Sample one token per row of `logits` (R, vocab) for `seqs`, with their histories and grammar masks.

    Plain rows (no logprobs, no grammar) take `sample`'s path, which for greedy rows without penalties or bias is
    a bare argmax; only a batch where some row asks for logprobs or has a grammar builds the extra tensors."""
    params = [s.params for s in seqs]
    generators = [s.generator for s in seqs]
    histories = [s.history for s in seqs] if any(s.history is not None for s in seqs) else None
    if not any(s.structured is not None or s.params.logprobs is not None for s in seqs):
        return sample(logits, params, generators, histories).tolist(), None  # the one host sync
    allowed = [None if s.structured is None else s.structured.allowed_tokens() for s in seqs]
    out = sample_with_logprobs(logits, params, generators, histories, allowed)
    rows = out.rows() if out.logprobs is not None else None
    return out.tokens.tolist(), rows


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        max_slots: int,
        max_context: int,
        compile: str = "off",
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """`compile="decode"` runs decode steps through torch.compile (see compiled_decode.py); the KV cache then
        has one slot more than `max_slots`, a scratch slot for the rows that pad a batch to its bucket. The cache
        holds `kv_dtype` (default: the model's dtype; see model.kv_cache.resolve_kv_dtype)."""
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile: {compile!r} is not one of {', '.join(COMPILE_MODES)}")
        self.kv_dtype = kv_dtype
        self.max_slots = max_slots
        self.max_context = max_context
        self.compile = compile
        self.compiled: CompiledDecode | None = None
        self.model = model
        self.cache: KVCache = self._cache_for(model, None)
        self._use(model)

    def set_model(self, model: Transformer) -> None:
        """Serve `model` from now on, all or nothing: the new KV cache (when the shape changes) is allocated
        before anything is replaced, so a failure leaves the old model serving. The cache is cleared either
        way: nothing a previous model wrote (NaN from diverged weights included) is ever read again."""
        cache = self._cache_for(model, self.cache)
        cache.k.zero_()
        cache.v.zero_()
        self.cache = cache
        self._use(model)

    def _cache_for(self, model: Transformer, current: KVCache | None) -> KVCache:
        """`current` when its shape, dtype and device fit `model`, else a new cache."""
        c = model.config
        max_len = min(_round_up(self.max_context, KV_ALIGN), c.block_size)  # room for the rounding in `_kv_len`
        slots = self.max_slots + (self.compile == "decode")  # the compiled step's scratch slot
        shape = (c.n_layer, slots, c.n_kv_head, max_len, c.head_dim)
        if (
            current is not None
            and tuple(current.k.shape) == shape
            and current.k.dtype == (self.kv_dtype or model.dtype)
            and current.k.device == model.device
            and current.n_rep == c.n_rep
        ):
            return current
        return model.new_kv_cache(max_slots=slots, max_len=max_len, dtype=self.kv_dtype)

    def _use(self, model: Transformer) -> None:
        c = model.config
        self.model = model
        self.context = min(self.max_context, c.block_size)  # tokens a sequence may hold, prompt included
        self.device = model.device
        self.pad_id = c.pad_token_id if c.pad_token_id is not None and 0 <= c.pad_token_id < c.vocab_size else 0
        # A model whose blocks run on the native int4 kernels (model/native.py) keeps nothing per shape, fused or not:
        # padding would only add work there (a 17-token prompt computed 32 rows).
        self.native_prefill = model.dtype == torch.float32 and native.fused_blocks(model.layers)
        if self.compile == "decode":
            if self.compiled is not None:
                # The old model's graphs hold its weights: drop them; the new model compiles on first use.
                torch._dynamo.reset()
            self.compiled = CompiledDecode(model, self.cache, self.max_slots, self.pad_id, KV_ALIGN)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def _kv_len(self, max_pos: int) -> int:
        """Keys a step attends: the batch's furthest position + 1, rounded up to a multiple of KV_ALIGN.

        CPU attention in bf16 takes a different (differently rounded) path for a partial last block of keys.
        With the key count rounded up, a row's result no longer depends on which other rows share its batch,
        so a greedy request gives the same tokens alone or in a full batch. Masked keys cost little.
        """
        return min(_round_up(max_pos + 1, KV_ALIGN), self.max_len)

    @torch.inference_mode()
    def run(self, batch: Batch) -> RunOutput:
        """The sampled next token of every row: the prefill items (None for a chunk that does not end its
        prompt), then the decode sequences."""
        if batch.is_prefill:
            return self._packed(batch)
        return self._decode(batch)

    def _packed(self, batch: Batch) -> RunOutput:
        """Prompt chunks, and the decode rows of a mixed step, back to back in one row: no padding between them,
        so a step costs the tokens it has. A decode row is a one-token segment at its sequence's next position.
        Items with a `source` (n > 1 siblings) are not computed: they get a copy of their source's KV below."""
        decode = batch.decode
        items = [it for it in batch.prefill if it.source is None]
        if decode and not self._fuses(items):
            return self._one_kind_at_a_time(batch)
        for it in items:
            if it.prefix_slot is not None:  # the positions this chunk's tokens attend first, from another slot
                self.cache.copy_positions(it.prefix_slot, [it.seq.slot], it.start)
        max_pos = self.max_len - 1
        row = [s.output_ids[-1] for s in decode]
        positions = [s.total_len - 1 for s in decode]
        segments = [(s.slot, 1, self._kv_len(p)) for s, p in zip(decode, positions, strict=True)]
        last: list[int] = []
        for it in items:
            row += it.seq.prefill_ids(it.start, it.end)
            positions += range(it.start, it.end)
            last.append(len(row) - 1)
        # The row is padded to a few lengths (see PREFILL_ALIGN), except on the native int4 kernels. The padding
        # joins the last sequence and takes the positions after its real tokens: nothing reads them before a real
        # token overwrites them. Clamped so they stay inside the cache.
        n_pad = 0 if self.native_prefill else _round_up(len(row), PREFILL_ALIGN) - len(row)
        row += [self.pad_id] * n_pad
        positions += [min(p, max_pos) for p in range(items[-1].end, items[-1].end + n_pad)]
        for it in items:
            length, furthest = it.end - it.start, it.end - 1
            if it is items[-1]:
                length, furthest = length + n_pad, min(furthest + n_pad, max_pos)
            segments.append((it.seq.slot, length, self._kv_len(furthest)))
        # Echo with logprobs: the logits of the prompt positions to score come after the last-token rows.
        scored = prompt_logprobs.plan([(it.seq, it.start, it.end) for it in items], last)
        nd = len(decode)
        index = list(range(nd)) + last + [r for s in scored for r in s.rows]
        cache_batch = CacheBatch.build_packed(self.cache, segments, positions, logits_index=index)
        logits = self.model(torch.tensor([row], dtype=torch.long, device=self.device), batch=cache_batch)
        if scored:
            prompt_logprobs.collect(logits[nd + len(last) :], scored)
            logits = logits[: nd + len(last)]
        # (nd + len(items), vocab)
        logits_row = {id(it.seq): nd + i for i, it in enumerate(items) if it.completes_prompt}
        # Only rows that finish their prompt sample, so a seeded row draws the same numbers however its
        # prompt was chunked. A sibling samples its own first token from its source's last-position logits.
        done = [i for i, it in enumerate(batch.prefill) if it.completes_prompt]
        out: list[int | None] = [None] * batch.size
        if not done and not decode:
            return RunOutput(out)
        copies: dict[int, tuple[int, list[int]]] = {}  # source slot -> (length, sibling slots): one copy per source
        for it in batch.prefill:
            if it.source is not None:
                copies.setdefault(it.source.slot, (it.end, []))[1].append(it.seq.slot)
        for src, (length, dst) in copies.items():
            self.cache.copy_positions(src, dst, length)
        picks = list(range(nd)) + [logits_row[id(batch.prefill[i].source or batch.prefill[i].seq)] for i in done]
        if picks != list(range(logits.shape[0])):
            logits = logits[torch.tensor(picks, device=logits.device)]
        tokens, lps = sample_rows(logits, [*decode, *(batch.prefill[i].seq for i in done)])
        rows = [len(batch.prefill) + j for j in range(nd)] + done  # the batch row of each sampled token
        for r, t in zip(rows, tokens, strict=True):
            out[r] = t
        logprobs: list[TokenLogprobs | None] | None = None
        if lps is not None:
            logprobs = [None] * batch.size
            for r, lp in zip(rows, lps, strict=True):
                logprobs[r] = lp
        return RunOutput(out, logprobs)

    def _fuses(self, items: list[PrefillItem]) -> bool:
        """Whether the model computes these prompt chunks with decode rows in one pass (the native fused layers),
        each decode row as it would be alone; see `model.native.token_rows`."""
        if not self.native_prefill:
            return False
        chunks = [it for it in items if it.end - it.start > 1]
        tokens = sum(it.end - it.start for it in chunks)
        keys = sum((it.start + it.end + 1) * (it.end - it.start) // 2 for it in chunks)  # sum of position + 1
        return native.fuses_prompt(tokens, keys)

    def _one_kind_at_a_time(self, batch: Batch) -> RunOutput:
        """A mixed step as a prefill pass, then a decode pass: the decode rows then get exactly the results a
        decode step gives them."""
        prefill = self._packed(Batch(prefill=batch.prefill, decode=[]))
        decode = self._decode(Batch(prefill=[], decode=batch.decode))
        logprobs = None
        if prefill.logprobs is not None or decode.logprobs is not None:
            logprobs = [*(prefill.logprobs or [None] * len(batch.prefill))]
            logprobs += decode.logprobs or [None] * len(batch.decode)
        return RunOutput(prefill.tokens + decode.tokens, logprobs)

    def _decode(self, batch: Batch) -> RunOutput:
        seqs = batch.decode
        next_ids = [s.output_ids[-1] for s in seqs]
        slots = [s.slot for s in seqs]
        last_pos = [s.total_len - 1 for s in seqs]
        kv_len = self._kv_len(max(last_pos))
        # None when not compiling, or once compilation failed: then the eager step.
        logits = None if self.compiled is None else self.compiled(next_ids, slots, last_pos, kv_len)
        if logits is None:
            idx = torch.tensor(next_ids, dtype=torch.long, device=self.device).view(-1, 1)
            # Positions go in as host ints: the batch checks them against the cache without a device sync.
            cache_batch = CacheBatch.build(self.cache, slots, [[p] for p in last_pos], kv_len=kv_len)
            logits = self.model(idx, batch=cache_batch)[:, 0]  # (B, vocab)
        tokens, logprobs = sample_rows(logits, seqs)
        return RunOutput([*tokens], logprobs)
