"""Incremental decoding on the cache equals a full forward pass, however the batch is arranged."""

import pytest
import torch

from model.kv_cache import KVCache

ATOL = 1e-5


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
                logits = tiny_model(tokens[b : b + 1, :n], torch.arange(n).unsqueeze(0), cache, slots=[slots[b]],
                                    logits_index=torch.tensor([n - 1]))
                torch.testing.assert_close(logits[0], full[b, n - 1], atol=ATOL, rtol=0)
                pos[b] = n
                active.append(b)
        decoding = [b for b in active if join_step[b] < step and pos[b] < 30]
        if not decoding:
            continue
        idx = torch.stack([tokens[b, pos[b] : pos[b] + 1] for b in decoding])
        input_pos = torch.tensor([[pos[b]] for b in decoding])
        logits = tiny_model(idx, input_pos, cache, slots=[slots[b] for b in decoding])
        for row, b in enumerate(decoding):
            torch.testing.assert_close(logits[row, 0], full[b, pos[b]], atol=ATOL, rtol=0)
            pos[b] += 1


@torch.no_grad()
def test_padded_batched_prefill_and_slot_reuse(tiny_model, seqs):
    tokens, full = seqs
    cache = tiny_model.new_kv_cache(max_slots=2, max_len=32)
    # Fill slot 1 with an unrelated long sequence first: its stale entries must never be read later.
    tiny_model(tokens[2:3, :25], torch.arange(25).unsqueeze(0), cache, slots=[1])
    # Two prompts of lengths 12 and 5 in one right-padded pass (pad positions continue past the prompt).
    lens = [12, 5]
    idx = torch.zeros(2, 12, dtype=torch.long)
    idx[0] = tokens[0, :12]
    idx[1, :5] = tokens[1, :5]
    input_pos = torch.arange(12).unsqueeze(0).repeat(2, 1)
    logits = tiny_model(idx, input_pos, cache, slots=[0, 1], logits_index=torch.tensor([11, 4]))
    torch.testing.assert_close(logits[0], full[0, 11], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], full[1, 4], atol=ATOL, rtol=0)
    # Decoding continues correctly for both, overwriting the padded positions of slot 1.
    for t in range(6):
        p = [lens[0] + t, lens[1] + t]
        out = tiny_model(torch.stack([tokens[0, p[0] : p[0] + 1], tokens[1, p[1] : p[1] + 1]]),
                         torch.tensor([[p[0]], [p[1]]]), cache, slots=[0, 1])
        torch.testing.assert_close(out[0, 0], full[0, p[0]], atol=ATOL, rtol=0)
        torch.testing.assert_close(out[1, 0], full[1, p[1]], atol=ATOL, rtol=0)


@torch.no_grad()
def test_packed_prefill_matches_full_forward(tiny_model, seqs):
    """Three prompt chunks back to back in one row, one of them continuing a prompt already in the cache, with
    padding after the last; each reads only its own slot, stale entries included."""
    tokens, full = seqs
    cache = tiny_model.new_kv_cache(max_slots=3, max_len=32)
    tiny_model(tokens[2:3, :25], torch.arange(25).unsqueeze(0), cache, slots=[0])  # stale entries in slot 0
    tiny_model(tokens[1:2, :6], torch.arange(6).unsqueeze(0), cache, slots=[2])  # the first chunk of sequence 1
    # Sequence 0 (9 tokens) in slot 0, sequence 1 positions 6..13 in slot 2, sequence 2 (5 tokens + 3 padding) in 1.
    row = torch.cat([tokens[0, :9], tokens[1, 6:14], tokens[2, :5], torch.zeros(3, dtype=torch.long)])
    positions = torch.cat([torch.arange(9), torch.arange(6, 14), torch.arange(8)])
    segments = [(0, 9, 32), (2, 8, 14), (1, 8, 8)]
    logits = tiny_model(row.unsqueeze(0), positions.unsqueeze(0), cache, segments=segments,
                        logits_index=torch.tensor([8, 16, 21]))
    torch.testing.assert_close(logits, torch.stack([full[0, 8], full[1, 13], full[2, 4]]), atol=ATOL, rtol=0)
    # Decoding goes on from what the packed pass wrote, over slot 1's padding.
    pos = [9, 14, 5]
    for _ in range(5):
        idx = torch.stack([tokens[b, pos[b] : pos[b] + 1] for b in range(3)])
        out = tiny_model(idx, torch.tensor([[p] for p in pos]), cache, slots=[0, 2, 1])
        for b in range(3):
            torch.testing.assert_close(out[b, 0], full[b, pos[b]], atol=ATOL, rtol=0)
            pos[b] += 1


def test_packed_segments_must_cover_the_row(tiny_model):
    cache = tiny_model.new_kv_cache(max_slots=2, max_len=32)
    row = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="cover 5 tokens"):
        tiny_model(row, torch.arange(6).unsqueeze(0), cache, segments=[(0, 3, 3), (1, 2, 2)])
    with pytest.raises(ValueError, match="max_len"):
        tiny_model(row, torch.arange(6).unsqueeze(0), cache, segments=[(0, 6, 64)])


@torch.no_grad()
def test_chunked_prefill_matches(tiny_model, seqs):
    tokens, full = seqs
    cache = tiny_model.new_kv_cache(max_slots=1, max_len=32)
    for start, end in [(0, 8), (8, 20), (20, 30)]:
        out = tiny_model(tokens[:1, start:end], torch.arange(start, end).unsqueeze(0), cache, slots=[0])
        torch.testing.assert_close(out[0], full[0, start:end], atol=ATOL, rtol=0)


@torch.no_grad()
def test_bf16_cache_decoding_tracks_fp32(tiny_model, seqs):
    tokens, full = seqs
    model = type(tiny_model)(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    model = model.to(torch.bfloat16).eval()
    cache = model.new_kv_cache(max_slots=1, max_len=32)
    assert cache.k.dtype == torch.bfloat16
    out = model(tokens[:1, :20], torch.arange(20).unsqueeze(0), cache, slots=[0])
    assert (out[0] - full[0, :20]).abs().max() < 0.1
