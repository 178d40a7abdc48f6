"""Shared fixtures: a tiny checkpoint, real server subprocesses and the figures every test records."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from model.bundled import default_checkpoint
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.llama import Transformer
from model.tokenizer import load_tokenizer
from tests.reliability.harness import ServerProcess

# The tiny preset with a long context, so that a tiny model's request can be kept running for seconds.
TINY_CONFIG = ModelConfig.from_name("tiny").replace(block_size=2048)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(default_checkpoint())


@pytest.fixture(scope="session")
def save_tiny(tokenizer) -> Callable[..., Path]:
    """save_tiny(dir, seed=0): a tiny checkpoint written like the trainer writes one (atomically)."""

    def save(path: Path, seed: int = 0) -> Path:
        m = Transformer(TINY_CONFIG)
        m.init_weights(seed)
        return save_checkpoint(path, m, tokenizer=tokenizer)

    return save


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, save_tiny) -> Path:
    return save_tiny(tmp_path_factory.mktemp("reliability-ckpt") / "tiny")


# Settings for tiny servers: fp32 (bf16 buys nothing at this size), one torch thread so that a test's
# clients and the server share the 2 CI cores, no reload polling unless a test asks for it.
TINY_SETTINGS = dict(dtype="float32", threads=1, reload_interval=0, max_batch_size=4, max_queue=64, log_level="INFO")


@pytest.fixture
def start_server(tmp_path) -> Iterator[Callable[..., ServerProcess]]:
    """start_server(checkpoint, **settings): a started server subprocess, stopped when the test ends."""
    servers: list[ServerProcess] = []

    def start(checkpoint, ready_timeout: float = 120.0, **settings) -> ServerProcess:
        merged = {**TINY_SETTINGS, **settings}
        server = ServerProcess(tmp_path / f"server-{len(servers)}.log", checkpoint, **merged)
        servers.append(server)
        return server.start(ready_timeout)

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def figures_file(tmp_path_factory) -> Iterator[tuple[Path, dict[str, dict]]]:
    """All tests' figures in one JSON file under the pytest tmp dir: {test name: figures}."""
    path = tmp_path_factory.getbasetemp() / "reliability-figures.json"
    collected: dict[str, dict] = {}
    yield path, collected
    print(f"\nreliability figures: {path}")


@pytest.fixture
def figures(request, figures_file) -> Iterator[dict]:
    """A dict the test fills with what it measured; printed (run pytest with -s) and saved as JSON, also
    when the test fails."""
    path, collected = figures_file
    data: dict = {}
    yield data
    name = request.node.name
    collected[name] = data
    path.write_text(json.dumps(collected, indent=2) + "\n")
    print(f"\n[figures] {name}: {json.dumps(data)}")
