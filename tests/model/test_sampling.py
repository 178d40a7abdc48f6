import pytest
import torch

from model.sampling import SamplingParams, sample

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
    params = [SamplingParams(0.0), SamplingParams(1.0, top_k=2, seed=1), SamplingParams(1.0, top_p=0.5, seed=2),
              SamplingParams(0.8, seed=3), SamplingParams(0.0), SamplingParams(1.0, top_k=4, top_p=0.9, seed=4)]
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


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5},
                                    {"temperature": float("nan")}])
def test_invalid_params_rejected(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)
