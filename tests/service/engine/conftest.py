"""Engine fixtures: an engine on the tiny model driven synchronously (no thread), and plain sequences."""

from __future__ import annotations

import time

import pytest
import torch

from model.sampling import SamplingParams
from service.engine import Engine, Sequence
from service.engine.loop import ModelInfo
from tests.service.conftest import tiny_model

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def make_engine(tokenizer):
    models = {}

    def make(dtype=torch.float32, **kw) -> Engine:
        if dtype not in models:
            models[dtype] = tiny_model(0).to(dtype)
        model = models[dtype]
        opts = dict(max_batch_size=4, max_context=512, max_queue=64, prefill_chunk=512)
        opts.update(kw)
        return Engine(model, tokenizer, info=ModelInfo("tiny"), **opts)

    return make


def run(engine: Engine, seqs: list[Sequence], max_steps: int = 10_000) -> None:
    """Drive the engine synchronously (no thread) until every sequence finished."""
    for s in seqs:
        engine.submit(s)
    for _ in range(max_steps):
        if all(s.finish_reason is not None for s in seqs):
            return
        engine.step()
    raise AssertionError("engine did not finish")


def prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.encode(f"Prompt {i}:" + " word" * (3 * i + 1), add_special_tokens=False) for i in range(n)]


def wait(pred, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False
