"""The chunked cross-entropy equals F.cross_entropy on full logits (loss and gradients), masks included."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.llama import Transformer
from trainer.loss import (
    IGNORE_INDEX,
    HiddenStatesOutput,
    chunked_cross_entropy,
    lm_loss,
    logits_output,
    use_hidden_states_output,
)


def _inputs(B=3, T=10, D=16, V=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen, requires_grad=True)
    weight = torch.randn(V, D, generator=gen).mul_(0.3).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=gen)
    return hidden, weight, targets


def _reference(hidden, weight, targets, reduction="mean"):
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_size", [1, 7, 30, 4096])
def test_loss_and_gradients_match_full_logits_with_masked_rows(chunk_size):
    hidden, weight, targets = _inputs()
    targets[0, :4] = IGNORE_INDEX  # a prompt, masked as SFT does
    targets[1] = IGNORE_INDEX  # a row with no label at all
    ref = _reference(hidden, weight, targets)
    got = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    got_grads = _grads(got, hidden, weight)
    for g, r in zip(got_grads, _grads(ref, hidden, weight), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    # The fully masked row gets exactly no gradient.
    assert got_grads[0][1].abs().max() == 0


def test_sum_reduction_and_upstream_gradient_scale():
    hidden, weight, targets = _inputs(seed=1)
    targets[2, 5:] = IGNORE_INDEX
    ref = _reference(hidden, weight, targets, reduction="sum") * 0.25
    got = chunked_cross_entropy(hidden, weight, targets, chunk_size=8, reduction="sum") * 0.25
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(_grads(got, hidden, weight), _grads(ref, hidden, weight), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, targets = _inputs()
    targets.fill_(IGNORE_INDEX)
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert loss.item() == 0.0
    assert all(g.abs().max() == 0 for g in _grads(loss, hidden, weight))


def test_no_grad_computes_the_loss_only():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(hidden, weight, targets).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reduction": "none"}, "reduction"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match=message):
        chunked_cross_entropy(hidden, weight, targets, **kwargs)


def test_shape_mismatch_is_named():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(hidden, weight, targets[:, :-1])
    with pytest.raises(ValueError, match="hidden size"):
        chunked_cross_entropy(hidden, weight[:, :-1], targets)


def _tiny(seed=3, **overrides):
    config = replace(ModelConfig.from_name("tiny"), vocab_size=512, **overrides)
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights(seed)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_lm_loss_on_the_model_matches_logits_loss(tie):
    """The whole model (tied or not): hidden-state output plus chunked loss equals logits plus F.cross_entropy,
    parameter gradients included (the tied weight gets both its embedding and its projection gradient)."""
    model = _tiny(tie_embeddings=tie)
    idx = torch.randint(0, 512, (2, 24))
    targets = torch.randint(0, 512, (2, 24))
    targets[1] = IGNORE_INDEX
    targets[0, :5] = IGNORE_INDEX
    positions = torch.cat([torch.arange(12), torch.arange(12)]).expand(2, 24)  # two packed sequences a row

    ref = F.cross_entropy(model(idx, positions).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    keys = set(model.state_dict())

    use_hidden_states_output(model)
    assert isinstance(model.output, HiddenStatesOutput)
    assert set(model.state_dict()) == keys
    assert (model.output.weight is model.tok_embeddings.weight) == tie
    loss = lm_loss(model, idx, targets, positions, chunk_size=10)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)

    with torch.no_grad(), logits_output(model):
        logits = model(idx)
    assert logits.shape == (2, 24, 512)
    assert isinstance(model.output, HiddenStatesOutput)
    torch.testing.assert_close(
        chunked_cross_entropy(model(idx), model.output.weight, targets),
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()),
        rtol=1e-5,
        atol=1e-6,
    )


def test_autocast_bfloat16_runs_the_matmuls_in_bfloat16_and_keeps_fp32_gradients():
    """Under autocast the chunked loss computes what the model's bf16 output projection would, and the fp32
    weight gets an fp32 gradient."""
    hidden, weight, targets = _inputs(B=2, T=6, D=16, V=40, seed=2)
    targets[0, :2] = IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_cross_entropy(hidden, weight, targets, chunk_size=5)
        logits = (hidden @ weight.T).float()
    assert logits.dtype == torch.float32 and got.dtype == torch.float32
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    got_grads, ref_grads = _grads(got, hidden, weight), _grads(ref, hidden, weight)
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3)
