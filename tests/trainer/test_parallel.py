"""FSDP2 on 2 CPU processes matches one process; activation checkpointing and torch.compile change no result."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.loss import lm_loss
from trainer.parallel import apply_activation_checkpointing, maybe_compile, unwrap_model

_spec = importlib.util.spec_from_file_location("fsdp_worker", Path(__file__).with_name("fsdp_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


@pytest.fixture(scope="module")
def single_process_losses():
    torch.manual_seed(0)
    model = worker.build()
    return worker.train(model, worker.optimizer_for(model), range(worker.STEPS))


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_processes_match_one_with_the_same_global_batch(mode, single_process_losses, tmp_path):
    """FSDP2 (and DDP, for the chunked loss reading the output weight outside the wrapper's forward) on 2 gloo
    processes, each with half of the global batch, give the losses of one process with all of it."""
    worker.launch(mode, tmp_path)
    got = worker.read_losses(tmp_path / "losses.json")
    assert sorted(got) == list(range(1, worker.STEPS + 1))
    for step, loss in single_process_losses.items():
        assert abs(got[step] - loss) < 1e-5, (step, got[step], loss)
    # The model learns on these batches, so equal losses after step 1 mean equal updates.
    assert len(set(got.values())) == worker.STEPS


def _loss_and_grads(model, x, y, positions):
    loss = lm_loss(model, x, y, positions, chunk_size=16)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_activation_checkpointing_recomputes_blocks_and_changes_nothing():
    model = worker.build()
    checkpointed = apply_activation_checkpointing(copy.deepcopy(model))
    apply_activation_checkpointing(checkpointed)  # a second call is a no-op, not a double recomputation
    assert checkpointed.state_dict().keys() == model.state_dict().keys()
    x, y = worker.batch(0, 0, 1)
    y = y.clone()  # a view of the same tokens as x
    y[0, :5] = -100
    positions = torch.cat([torch.arange(6), torch.arange(10)]).expand(x.shape[0], -1)  # packed rows

    calls = []
    for m in (model, checkpointed):
        m.layers[0].feed_forward.register_forward_pre_hook(lambda *_: calls.append(1))
    loss, grads = _loss_and_grads(model, x, y, positions)
    assert len(calls) == 1
    ac_loss, ac_grads = _loss_and_grads(checkpointed, x, y, positions)
    assert len(calls) == 3  # forward, then the recomputation in backward

    torch.testing.assert_close(ac_loss, loss, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(ac_grads[name], g, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow  # ~165 s on the shared 2-core CPU: inductor compiles the block's forward and backward kernels
def test_compile_matches_eager_and_saves_plain_keys():
    """Per-block torch.compile (in place) gives the eager losses within fp32 tolerance over a few steps, and its
    state dict loads into an uncompiled model."""
    eager = worker.build()
    compiled = maybe_compile(copy.deepcopy(eager))
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    expected = worker.train(eager, worker.optimizer_for(eager), range(3))
    got = worker.train(compiled, worker.optimizer_for(compiled), range(3))
    for step, loss in expected.items():
        assert abs(got[step] - loss) < 1e-4, (step, got[step], loss)
    fresh = worker.build()
    fresh.load_state_dict(compiled.state_dict())
    x, _ = worker.batch(7, 0, 1)
    torch.testing.assert_close(fresh(x), compiled(x), rtol=1e-4, atol=1e-5)


def test_unwrap_model_strips_a_torch_compile_wrapper():
    model = worker.build()
    wrapped = torch.compile(model)  # lazily compiled: nothing runs here
    assert any(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    assert unwrap_model(wrapped) is model
    assert unwrap_model(model) is model
    assert maybe_compile(model, enabled=False) is model
    x, y = worker.batch(0, 0, 1)
    torch.testing.assert_close(
        lm_loss(unwrap_model(wrapped), x, y),
        F.cross_entropy((model(x) @ model.output.weight.T).flatten(0, 1), y.flatten()),
    )
