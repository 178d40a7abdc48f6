import pytest
import torch

from model.sampling import SamplingParams, TokenHistory, sample, sample_with_logprobs

V = 500


@pytest.fixture
def logits():
    return torch.randn(6, V, generator=torch.Generator().manual_seed(0)) * 3


def _gens(params):
    return [p.make_generator() for p in params]


def test_greedy_is_argmax(logits):
    params = [SamplingParams(temperature=0.0)] * 6
    assert torch.equal(sample(logits, params, _gens(params)), logits.argmax(-1))


def test_top_k_one_equals_greedy(logits):
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(6)]
    assert torch.equal(sample(logits, params, _gens(params)), logits.argmax(-1))


def _draw(logits_row, p, others, steps=40):
    """Tokens of a seeded row over `steps` draws, placed at row 2 of a batch with `others`."""
    batch = torch.stack([others[0], others[1], logits_row, others[2]])
    params = [SamplingParams(0.7, 5, 0.9, seed=99), SamplingParams(0.0), p, SamplingParams(1.0, 0, 1.0)]
    gens = _gens(params)
    return [int(sample(batch, params, gens)[2]) for _ in range(steps)]


def test_seeded_request_reproducible_alone_and_in_batch(logits):
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    g = p.make_generator()
    alone = [int(sample(logits[:1], [p], [g])[0]) for _ in range(40)]
    assert alone == _draw(logits[0], p, logits[1:4])
    assert alone == _draw(logits[0], p, logits[3:6])
    assert len(set(alone)) > 1  # it really samples


def test_unseeded_requests_differ(logits):
    p = SamplingParams(temperature=1.0)
    draws = {tuple(int(sample(logits[:1], [p], [p.make_generator()])[0]) for _ in range(5)) for _ in range(5)}
    assert len(draws) > 1


@pytest.mark.parametrize("top_k", [3, 17])
def test_top_k_never_leaves_the_k_best(logits, top_k):
    params = [SamplingParams(temperature=2.0, top_k=top_k, seed=i) for i in range(6)]
    gens = _gens(params)
    allowed = logits.topk(top_k, dim=-1).indices
    for _ in range(200):
        tok = sample(logits, params, gens)
        assert all(tok[b] in allowed[b] for b in range(6))


def test_top_p_never_leaves_the_nucleus(logits):
    top_p = 0.6
    params = [SamplingParams(temperature=1.0, top_p=top_p, seed=i) for i in range(6)]
    gens = _gens(params)
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    nucleus = [set(order[b, : int((sorted_p[b].cumsum(0) < top_p).sum()) + 1].tolist()) for b in range(6)]
    seen = [set() for _ in range(6)]
    for _ in range(300):
        for b, t in enumerate(sample(logits, params, gens).tolist()):
            assert t in nucleus[b]
            seen[b].add(t)
    assert any(len(s) > 1 for s in seen)


def test_mixed_settings_per_row(logits):
    params = [
        SamplingParams(0.0),
        SamplingParams(1.0, top_k=2, seed=1),
        SamplingParams(1.0, top_p=0.5, seed=2),
        SamplingParams(0.8, seed=3),
        SamplingParams(0.0),
        SamplingParams(1.0, top_k=4, top_p=0.9, seed=4),
    ]
    gens = _gens(params)
    for _ in range(50):
        tok = sample(logits, params, gens)
        assert tok[0] == logits[0].argmax() and tok[4] == logits[4].argmax()
        assert tok[1] in logits[1].topk(2).indices and tok[5] in logits[5].topk(4).indices


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    p = SamplingParams(temperature=1.0, seed=5)
    g = p.make_generator()
    counts = torch.bincount(torch.cat([sample(logits, [p], [g]) for _ in range(3000)]), minlength=3)
    assert torch.allclose(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}, {"temperature": float("nan")}]
)
def test_invalid_params_rejected(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_penalties_match_a_hand_computed_example():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0]])
    p = SamplingParams(
        temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=5
    )
    h = TokenHistory(p, prompt_ids=[1])
    for t in (2, 2, 3):
        h.record(t)
    out = sample_with_logprobs(logits, [p], [None], [h])
    # token 0: unseen, 2.0 | 1: in the prompt, negative, -1.0 * 2 | 2: 0.5 / 2 - 0.5 - 2 * 0.25
    # token 3: 1.0 / 2 - 0.5 - 0.25 | 4: unseen, 0.0
    expected = torch.log_softmax(torch.tensor([2.0, -2.0, -0.75, -0.25, 0.0]), -1)
    got = torch.full((5,), float("nan"))
    got[out.top_ids[0]] = out.top_logprobs[0]
    assert torch.allclose(got, expected, atol=1e-6)
    assert out.tokens.tolist() == [0]
    assert h.num_generated == 4 and h.counts.tolist() == [1, 0, 2, 1, 0]


def test_frequency_penalty_steers_greedy_away_from_repeats():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    p = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    h = TokenHistory(p, prompt_ids=[0])
    # Counts only cover generated tokens: the prompt's token 0 is not penalised by frequency_penalty.
    assert [int(sample(logits, [p], [None], [h])[0]) for _ in range(4)] == [0, 1, 0, 1]


def test_penalties_without_history_are_refused(logits):
    with pytest.raises(ValueError, match="TokenHistory"):
        sample(logits[:1], [SamplingParams(presence_penalty=1.0)], [None])
    with pytest.raises(ValueError, match="TokenHistory"):
        sample(logits[:2], [SamplingParams(0.0), SamplingParams(0.0, min_tokens=2)], [None, None], [None, None])


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    params = [SamplingParams(temperature=1.0, min_p=0.2, seed=1), SamplingParams(temperature=1.0, min_p=0.7, seed=2)]
    gens = _gens(params)
    seen = [set(), set()]
    for _ in range(400):
        for b, t in enumerate(sample(logits, params, gens).tolist()):
            seen[b].add(t)
    assert seen == [{0, 1, 2}, {0}]  # 0.05 < 0.2 * 0.5; only 0.5 >= 0.7 * 0.5


def test_logit_bias_forces_and_bans_tokens(logits):
    force = {7: 100.0}
    ban = {int(logits[1].argmax()): -100.0}
    params = [
        SamplingParams(0.0, logit_bias=force),
        SamplingParams(0.0, logit_bias=ban),
        SamplingParams(1.5, seed=3, logit_bias=force),
        SamplingParams(1.0, top_k=5, top_p=0.9, seed=4, logit_bias=force),
    ]
    gens = _gens(params)
    for _ in range(30):
        tok = sample(logits[:4], params, gens).tolist()
        assert tok[0] == tok[2] == tok[3] == 7
        assert tok[1] == int(logits[1].topk(2).indices[1])


def test_min_tokens_blocks_end_ids_until_reached():
    logits = torch.tensor([[5.0, 1.0, 4.0, 0.0]])  # 0 is EOS and by far the likeliest, 2 a stop token id
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(2,))
    h = TokenHistory(p, prompt_ids=[3], end_ids=[0])
    assert [int(sample(logits, [p], [None], [h])[0]) for _ in range(4)] == [1, 1, 1, 0]


def test_min_tokens_yields_to_a_mask_that_only_allows_the_end():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    p = SamplingParams(temperature=0.0, min_tokens=5)
    h = TokenHistory(p, prompt_ids=[1], end_ids=[0])
    only_end = torch.tensor([True, False, False])
    assert sample(logits, [p], [None], [h], allowed=[only_end]).tolist() == [0]


def test_allowed_mask_restricts_greedy_and_sampled_rows(logits):
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[3, 11, 42]] = True
    short = torch.zeros(10, dtype=torch.bool)  # ids past the mask's length are forbidden
    short[9] = True
    params = [SamplingParams(0.0), SamplingParams(2.0, seed=1), SamplingParams(0.0), SamplingParams(0.0)]
    gens = _gens(params)
    seen = set()
    for _ in range(100):
        tok = sample(logits[:4], params, gens, allowed=[allowed, allowed, short, None]).tolist()
        assert tok[0] == [3, 11, 42][int(logits[0, [3, 11, 42]].argmax())]
        assert tok[1] in (3, 11, 42) and tok[2] == 9 and tok[3] == int(logits[3].argmax())
        seen.add(tok[1])
    assert len(seen) > 1


def test_logprobs_cover_the_distribution_before_filtering():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1)) * 2
    params = [
        SamplingParams(0.7, top_k=3, seed=1, logprobs=20),
        SamplingParams(0.0, logprobs=20),
        SamplingParams(1.3, top_p=0.5, min_p=0.1, seed=2, logprobs=20),
    ]
    out = sample_with_logprobs(logits, params, _gens(params))
    assert torch.allclose(out.top_logprobs.exp().sum(-1), torch.ones(3), atol=1e-5)
    for b, temp in enumerate((0.7, 1.0, 1.3)):  # greedy rows report the temperature-1 distribution
        expected = torch.log_softmax(logits[b] / temp, -1)
        assert torch.allclose(out.top_logprobs[b], expected[out.top_ids[b]], atol=1e-5)


def test_top_logprobs_sorted_and_consistent_with_the_chosen_token(logits):
    params = [
        SamplingParams(0.0, logprobs=5),
        SamplingParams(1.0, seed=1, logprobs=20),
        SamplingParams(0.0),
        SamplingParams(1.0, top_k=10, seed=2, logprobs=0),
    ]
    gens = _gens(params)
    for _ in range(20):
        out = sample_with_logprobs(logits[:4], params, gens)
        rows = out.rows()
        assert rows[2] is None
        assert rows[0].top[0] == (rows[0].token, rows[0].logprob) and len(rows[0].top) == 5
        assert rows[3].top == [] and rows[3].logprob <= 0
        for r in (rows[0], rows[1]):
            lps = [lp for _, lp in r.top]
            assert lps == sorted(lps, reverse=True)
            assert dict(r.top).get(r.token, r.logprob) == pytest.approx(r.logprob)
            if r.token not in dict(r.top):
                assert r.logprob <= r.top[-1][1]


def _mixed_params():
    return [
        SamplingParams(0.8, top_k=20, seed=1, presence_penalty=1.5, frequency_penalty=0.5, logprobs=3),
        SamplingParams(0.0, repetition_penalty=1.3, logprobs=2),
        SamplingParams(1.0, top_p=0.9, min_p=0.05, seed=2, logit_bias={5: 3.0, 9: -4.0}),
        SamplingParams(0.0),
        SamplingParams(1.2, seed=3, min_tokens=4, repetition_penalty=0.8, stop_token_ids=(1,), logprobs=0),
        SamplingParams(1e-40, frequency_penalty=-1.0, logprobs=1),
    ]


def test_mixed_batch_equals_rows_alone(logits):
    params = _mixed_params()
    prompts = [[1, 2, 3], [4, 4], [5], [6, 7], [8], [9, 10]]
    allowed = [None, None, None, torch.arange(V) % 3 == 0, None, None]
    gens = _gens(params)
    hists = [TokenHistory(p, pr, end_ids=[0]) for p, pr in zip(params, prompts, strict=True)]
    batch = [sample_with_logprobs(logits, params, gens, hists, allowed) for _ in range(15)]
    for b, p in enumerate(params):
        g = p.make_generator()
        h = TokenHistory(p, prompts[b], end_ids=[0])
        alone = [sample_with_logprobs(logits[b : b + 1], [p], [g], [h], [allowed[b]]) for _ in range(15)]
        assert [int(o.tokens[0]) for o in alone] == [int(o.tokens[b]) for o in batch]
        if p.logprobs is not None:
            for a, o in zip(alone, batch, strict=True):
                got, want = a.rows()[0], o.rows()[b]
                assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
                assert [t for t, _ in got.top] == [t for t, _ in want.top]
        if h.counts is not None:
            assert torch.equal(h.counts, hists[b].counts)
        assert h.num_generated == hists[b].num_generated == 15
    assert len({int(o.tokens[2]) for o in batch}) > 1  # the sampled rows really sample


def test_plain_row_draws_the_same_next_to_a_top_p_row(logits):
    # A plain-temperature row inverts its CDF in vocabulary order even when a neighbour needs sorting.
    p = SamplingParams(temperature=1.0, seed=7)
    g = p.make_generator()
    alone = [int(sample(logits[:1], [p], [g])[0]) for _ in range(30)]
    others = [SamplingParams(1.0, top_p=0.8, seed=1), SamplingParams(1.0, top_k=4, seed=2)]
    params = [p, *others]
    gens = _gens(params)
    assert alone == [int(sample(logits[:3], params, gens)[0]) for _ in range(30)]


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6])
def test_tiny_temperature_is_greedy(logits, temperature):
    p = SamplingParams(temperature=temperature, seed=1)
    assert p.greedy
    big = logits * 1e4  # logits / 1e-40 would overflow to inf and give a NaN softmax
    mixed = [p, SamplingParams(1.0, seed=2), SamplingParams(temperature, top_p=0.5, seed=3, logprobs=2)]
    out = sample_with_logprobs(big[:3], mixed, _gens(mixed))
    assert out.tokens[0] == big[0].argmax() and out.tokens[2] == big[2].argmax()
    assert torch.isfinite(out.logprobs[2]) and out.top_ids[2, 0] == big[2].argmax()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_p": -0.1},
        {"min_p": 1.5},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"repetition_penalty": 0},
        {"repetition_penalty": float("nan")},
        {"logit_bias": {1: 101}},
        {"logit_bias": {-1: 1.0}},
        {"min_tokens": -1},
        {"stop_token_ids": (-5,)},
        {"logprobs": 21},
        {"logprobs": -1},
    ],
)
def test_invalid_new_params_rejected(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)
