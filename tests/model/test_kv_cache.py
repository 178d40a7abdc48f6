"""Incremental decoding on the cache equals a full forward pass, however the batch is arranged."""

import pytest
import torch

from model.kv_cache import CacheBatch, KVCache, resolve_kv_dtype

ATOL = 1e-5


def cached(model, idx, cache, slots, positions, **kw):
    """One forward pass over the cache: rows in `slots` at `positions` (B, T)."""
    return model(idx, batch=CacheBatch.build(cache, slots, positions, **kw))


@pytest.fixture(scope="module")
def seqs(tiny_model):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, tiny_model.config.vocab_size, (3, 30), generator=g)
    with torch.no_grad():
        full = tiny_model(tokens)  # (3, 30, V)
    return tokens, full


def test_cache_stores_kv_heads_only(tiny_model):
    cache = tiny_model.new_kv_cache(max_slots=4, max_len=32)
    c = tiny_model.config
    assert cache.k.shape == (c.n_layer, 4, c.n_kv_head, 32, c.head_dim)  # not n_head: GQA is not expanded
    assert cache.nbytes == 4 * 32 * KVCache.bytes_per_token(c.n_layer, c.n_kv_head, c.head_dim, torch.float32)


@torch.no_grad()
@pytest.mark.parametrize("slots", [[0, 1, 2], [3, 0, 2]], ids=["contiguous", "scattered"])
def test_staggered_batch_matches_full_forward(tiny_model, seqs, slots):
    """Three sequences with different prompt lengths, joining at different steps, decoded together."""
    tokens, full = seqs
    cache = tiny_model.new_kv_cache(max_slots=4, max_len=32)
    prompt_len = [10, 4, 7]
    join_step = [0, 3, 5]  # decode step at which each sequence's prompt pass happens
    pos = [0, 0, 0]
    active: list[int] = []
    for step in range(16):
        for b in range(3):
            if join_step[b] == step:
                n = prompt_len[b]
                logits = cached(
                    tiny_model,
                    tokens[b : b + 1, :n],
                    cache,
                    [slots[b]],
                    torch.arange(n).unsqueeze(0),
                    logits_index=torch.tensor([n - 1]),
                )
                torch.testing.assert_close(logits[0], full[b, n - 1], atol=ATOL, rtol=0)
                pos[b] = n
                active.append(b)
        decoding = [b for b in active if join_step[b] < step and pos[b] < 30]
        if not decoding:
            continue
        idx = torch.stack([tokens[b, pos[b] : pos[b] + 1] for b in decoding])
        input_pos = torch.tensor([[pos[b]] for b in decoding])
        logits = cached(tiny_model, idx, cache, [slots[b] for b in decoding], input_pos)
        for row, b in enumerate(decoding):
            torch.testing.assert_close(logits[row, 0], full[b, pos[b]], atol=ATOL, rtol=0)
            pos[b] += 1


@torch.no_grad()
def test_padded_batched_prefill_and_slot_reuse(tiny_model, seqs):
    tokens, full = seqs
    cache = tiny_model.new_kv_cache(max_slots=2, max_len=32)
    # Fill slot 1 with an unrelated long sequence first: its stale entries must never be read later.
    cached(tiny_model, tokens[2:3, :25], cache, [1], torch.arange(25).unsqueeze(0))
    # Two prompts of lengths 12 and 5 in one right-padded pass (pad positions continue past the prompt).
    lens = [12, 5]
    idx = torch.zeros(2, 12, dtype=torch.long)
    idx[0] = tokens[0, :12]
    idx[1, :5] = tokens[1, :5]
    input_pos = torch.arange(12).unsqueeze(0).repeat(2, 1)
    logits = cached(tiny_model, idx, cache, [0, 1], input_pos, logits_index=torch.tensor([11, 4]))
    torch.testing.assert_close(logits[0], full[0, 11], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], full[1, 4], atol=ATOL, rtol=0)
    # Decoding continues correctly for both, overwriting the padded positions of slot 1.
    for t in range(6):
        p = [lens[0] + t, lens[1] + t]
        out = cached(
            tiny_model,
            torch.stack([tokens[0, p[0] : p[0] + 1], tokens[1, p[1] : p[1] + 1]]),
            cache,
            [0, 1],
            [[p[0]], [p[1]]],
        )
        torch.testing.assert_close(out[0, 0], full[0, p[0]], atol=ATOL, rtol=0)
        torch.testing.assert_close(out[1, 0], full[1, p[1]], atol=ATOL, rtol=0)


@torch.no_grad()
def test_packed_prefill_matches_full_forward(tiny_model, seqs):
    """Three prompt chunks back to back in one row, one of them continuing a prompt already in the cache, with
    padding after the last; each reads only its own slot, stale entries included."""
    tokens, full = seqs
    cache = tiny_model.new_kv_cache(max_slots=3, max_len=32)
    cached(tiny_model, tokens[2:3, :25], cache, [0], torch.arange(25).unsqueeze(0))  # stale entries in slot 0
    cached(tiny_model, tokens[1:2, :6], cache, [2], torch.arange(6).unsqueeze(0))  # the first chunk of sequence 1
    # Sequence 0 (9 tokens) in slot 0, sequence 1 positions 6..13 in slot 2, sequence 2 (5 tokens + 3 padding) in 1.
    row = torch.cat([tokens[0, :9], tokens[1, 6:14], tokens[2, :5], torch.zeros(3, dtype=torch.long)])
    positions = torch.cat([torch.arange(9), torch.arange(6, 14), torch.arange(8)])
    segments = [(0, 9, 32), (2, 8, 14), (1, 8, 8)]
    batch = CacheBatch.build_packed(cache, segments, positions, logits_index=[8, 16, 21])
    logits = tiny_model(row.unsqueeze(0), batch=batch)
    torch.testing.assert_close(logits, torch.stack([full[0, 8], full[1, 13], full[2, 4]]), atol=ATOL, rtol=0)
    # Decoding goes on from what the packed pass wrote, over slot 1's padding.
    pos = [9, 14, 5]
    for _ in range(5):
        idx = torch.stack([tokens[b, pos[b] : pos[b] + 1] for b in range(3)])
        out = cached(tiny_model, idx, cache, [0, 2, 1], [[p] for p in pos])
        for b in range(3):
            torch.testing.assert_close(out[b, 0], full[b, pos[b]], atol=ATOL, rtol=0)
            pos[b] += 1


def test_packed_segments_must_cover_the_row(tiny_model):
    cache = tiny_model.new_kv_cache(max_slots=2, max_len=32)
    with pytest.raises(ValueError, match="cover 5 tokens"):
        CacheBatch.build_packed(cache, [(0, 3, 3), (1, 2, 3)], [0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="max_len"):
        CacheBatch.build_packed(cache, [(0, 6, 64)], range(6))


@torch.no_grad()
def test_chunked_prefill_matches(tiny_model, seqs):
    tokens, full = seqs
    cache = tiny_model.new_kv_cache(max_slots=1, max_len=32)
    for start, end in [(0, 8), (8, 20), (20, 30)]:
        out = cached(tiny_model, tokens[:1, start:end], cache, [0], torch.arange(start, end).unsqueeze(0))
        torch.testing.assert_close(out[0], full[0, start:end], atol=ATOL, rtol=0)


@torch.no_grad()
def test_bf16_cache_decoding_tracks_fp32(tiny_model, seqs):
    tokens, full = seqs
    model = type(tiny_model)(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    model = model.to(torch.bfloat16).eval()
    cache = model.new_kv_cache(max_slots=1, max_len=32)
    assert cache.k.dtype == torch.bfloat16
    out = cached(model, tokens[:1, :20], cache, [0], torch.arange(20).unsqueeze(0))
    assert (out[0] - full[0, :20]).abs().max() < 0.1


@torch.no_grad()
def test_an_fp16_cache_under_an_fp32_model_stores_rounded_keys_and_tracks_fp32(tiny_model, seqs, monkeypatch):
    """The PyTorch path (a packed prefill, then decode rows) on a cache stored in fp16: it stores the fp32 cache's
    keys and values rounded to fp16, and its logits stay within fp16 rounding of the fp32 cache's."""
    from model import native

    monkeypatch.setattr(native, "usable", lambda *tensors: False)  # the native kernels have their own test
    tokens, full = seqs
    ref = tiny_model.new_kv_cache(max_slots=2, max_len=32)
    half = tiny_model.new_kv_cache(max_slots=2, max_len=32, dtype=torch.float16)
    assert half.k.dtype == half.v.dtype == torch.float16 and half.nbytes * 2 == ref.nbytes
    steps = {}
    for cache in (ref, half):
        packed = CacheBatch.build_packed(cache, [(0, 12, 12), (1, 9, 9)], [*range(12), *range(9)])
        tiny_model(torch.cat([tokens[0, :12], tokens[1, :9]]).unsqueeze(0), batch=packed)
        steps[cache.k.dtype] = [
            cached(
                tiny_model,
                torch.stack([tokens[0, 12 + i], tokens[1, 9 + i]]).unsqueeze(1),
                cache,
                [0, 1],
                [[12 + i], [9 + i]],
            )
            for i in range(4)
        ]
    # The first layer's keys and values come from the same inputs: rounded once, as they came. Later layers' inputs
    # went through attention over fp16 keys already.
    assert torch.equal(half.k[0, :, :, :9], ref.k[0, :, :, :9].half())
    assert torch.equal(half.v[0, :, :, :9], ref.v[0, :, :, :9].half())
    torch.testing.assert_close(half.k[:, :, :, :9].float(), ref.k[:, :, :, :9], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(steps[torch.float32][0][0, 0], full[0, 12], atol=ATOL, rtol=0)
    for a, b in zip(steps[torch.float32], steps[torch.float16], strict=True):
        assert (a - b).abs().max() < 2e-2 * a.abs().max()
        assert not torch.equal(a, b)  # the fp16 cache really was read


def test_kv_cache_dtype_auto_is_fp16_only_under_a_quantized_fp32_model():
    assert resolve_kv_dtype("auto", torch.float32, quantized=True) == torch.float16
    assert resolve_kv_dtype("auto", torch.float32, quantized=False) == torch.float32  # exact by default
    assert resolve_kv_dtype("auto", torch.bfloat16, quantized=True) == torch.bfloat16
    assert resolve_kv_dtype("float32", torch.float32, quantized=True) == torch.float32
    assert resolve_kv_dtype("float16", torch.bfloat16, quantized=False) == torch.float16
    with pytest.raises(ValueError, match="kv_cache_dtype: expected one of auto, float32, float16, bfloat16"):
        resolve_kv_dtype("fp8", torch.float32, quantized=False)


def test_positions_outside_the_cache_are_refused(tiny_model):
    """A position or kv_len past max_len would write into the next slot's rows: refused, from host ints (no
    sync) as well as from tensors, and before anything is written."""
    cache = tiny_model.new_kv_cache(max_slots=2, max_len=8)
    with pytest.raises(ValueError, match="beyond the KV cache's max_len 8"):
        CacheBatch.build(cache, [0], [[8]])
    with pytest.raises(ValueError, match="beyond the KV cache's max_len 8"):
        CacheBatch.build(cache, [0, 1], torch.tensor([[3], [9]]))
    with pytest.raises(ValueError, match="kv_len 9"):
        CacheBatch.build(cache, [0], [[2]], kv_len=9)
    with pytest.raises(ValueError, match="kv_len 2 must cover position 4"):
        CacheBatch.build(cache, [0], [[4]], kv_len=2)
    with pytest.raises(ValueError, match="negative"):
        CacheBatch.build(cache, [0], [[-1]])
    with pytest.raises(ValueError, match="slots"):
        CacheBatch.build(cache, [2], [[0]])
    with pytest.raises(ValueError, match="beyond the KV cache's max_len 8"):
        CacheBatch.build_packed(cache, [(0, 3, 8), (1, 2, 8)], [5, 6, 7, 7, 8])
    with pytest.raises(ValueError, match="does not cover"):
        CacheBatch.build_packed(cache, [(0, 3, 2)], [0, 1, 2])
    assert not cache.k.any() and not cache.v.any()


@torch.no_grad()
def test_decode_batch_from_device_tensors_matches_build(tiny_model):
    """`CacheBatch.decode` (the traceable constructor of the compiled decode step) writes and reads where `build`
    does: same logits, same cache contents, for scattered slots at different positions."""
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, tiny_model.config.vocab_size, (3, 6), generator=g)
    slots, positions = [2, 0, 3], [[5], [2], [4]]
    idx = prompt[torch.arange(3), torch.tensor(positions).view(-1)].view(-1, 1)
    results = []
    for make in (
        lambda cache: CacheBatch.build(cache, slots, positions, kv_len=8),
        lambda cache: CacheBatch.decode(cache, torch.tensor(slots), torch.tensor(positions), 8),
    ):
        cache = tiny_model.new_kv_cache(max_slots=4, max_len=8)
        cached(tiny_model, prompt, cache, [2, 0, 3], [list(range(6))] * 3)  # the prompts' keys
        results.append((tiny_model(idx, batch=make(cache)), cache.k.clone(), cache.v.clone()))
    (logits, k, v), (logits_d, k_d, v_d) = results
    torch.testing.assert_close(logits_d, logits, atol=0, rtol=0)
    assert torch.equal(k_d, k) and torch.equal(v_d, v)


def test_a_cache_batch_owns_its_positions(tiny_model):
    cache = tiny_model.new_kv_cache(max_slots=1, max_len=8)
    batch = CacheBatch.build(cache, [0], [[0, 1]])
    with pytest.raises(ValueError, match="positions"):
        tiny_model(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 1]]), batch)


@torch.no_grad()
def test_packed_training_rows_keep_sequences_apart(tiny_model):
    """Several sequences in one training row, positions restarting at 0 for each: every sequence's logits equal
    its logits alone, while without positions the row stays one causal sequence."""
    g = torch.Generator().manual_seed(3)
    V = tiny_model.config.vocab_size
    parts = [torch.randint(0, V, (n,), generator=g) for n in (7, 12, 5)]
    alone = [tiny_model(p.unsqueeze(0))[0] for p in parts]
    row = torch.cat(parts).unsqueeze(0)
    positions = torch.cat([torch.arange(len(p)) for p in parts]).unsqueeze(0)
    packed = tiny_model(row, positions)[0]
    start = 0
    for p, ref in zip(parts, alone, strict=True):
        torch.testing.assert_close(packed[start : start + len(p)], ref, atol=ATOL, rtol=0)
        start += len(p)
    # The second row of a batch may be packed differently; rows stay independent.
    other = torch.cat([parts[2], parts[0], parts[1]]).unsqueeze(0)
    other_pos = torch.cat([torch.arange(len(parts[i])) for i in (2, 0, 1)]).unsqueeze(0)
    both = tiny_model(torch.cat([row, other]), torch.cat([positions, other_pos]))
    torch.testing.assert_close(both[1, : len(parts[2])], alone[2], atol=ATOL, rtol=0)
    torch.testing.assert_close(both[0], packed, atol=ATOL, rtol=0)
    # Plain causal without positions: the second sequence sees the first, so its logits differ from alone.
    plain = tiny_model(row)[0]
    torch.testing.assert_close(plain[:7], alone[0], atol=ATOL, rtol=0)
    assert (plain[7:19] - alone[1]).abs().max() > 1e-3
    # Positions 0..T-1 given explicitly match the fast causal path.
    torch.testing.assert_close(
        tiny_model(row, torch.arange(row.shape[1]).unsqueeze(0)), tiny_model(row), atol=ATOL, rtol=0
    )


def test_copy_positions_copies_a_prefix_into_other_slots_and_nothing_else():
    cache = KVCache(n_layer=3, max_slots=4, max_len=8, n_kv_head=2, head_dim=4)
    cache.k.normal_()
    cache.v.normal_()
    before_k, before_v = cache.k.clone(), cache.v.clone()
    cache.copy_positions(1, [0, 3], 5)
    for dst in (0, 3):
        assert torch.equal(cache.k[:, dst, :, :5], before_k[:, 1, :, :5])
        assert torch.equal(cache.v[:, dst, :, :5], before_v[:, 1, :, :5])
        assert torch.equal(cache.k[:, dst, :, 5:], before_k[:, dst, :, 5:])  # past the prefix: untouched
    assert torch.equal(cache.k[:, 1:3], before_k[:, 1:3]) and torch.equal(cache.v[:, 1:3], before_v[:, 1:3])
    with pytest.raises(ValueError, match="outside"):
        cache.copy_positions(0, [4], 2)
    with pytest.raises(ValueError, match="max_len"):
        cache.copy_positions(0, [1], 9)
