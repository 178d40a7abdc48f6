"""Shared fixtures: a tiny checkpoint with the bundled tokenizer, app clients and a real uvicorn server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from model.bundled import default_checkpoint
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.llama import Transformer
from model.tokenizer import load_tokenizer
from service.__main__ import uvicorn_config
from service.app import create_app
from service.settings import Settings

# A long block size keeps a tiny model busy for seconds when a test needs a request still running.
TINY_CONFIG = ModelConfig.from_name("tiny").replace(block_size=2048)


def tiny_model(seed: int) -> Transformer:
    model = Transformer(TINY_CONFIG)
    model.init_weights(seed=seed)
    # Random norm weights make the logits less flat, so greedy choices are not near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
            else:
                p.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def torch_threads(request):
    """One torch thread: tiny models gain nothing from threads, and spinning thread pools crawl on a shared, busy
    CPU. A test module that needs more sets TORCH_THREADS."""
    before = torch.get_num_threads()
    torch.set_num_threads(getattr(request.module, "TORCH_THREADS", 1))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(default_checkpoint())


@pytest.fixture(scope="session")
def save_tiny(tokenizer):
    def save(path: Path, seed: int = 0) -> Path:
        return save_checkpoint(path, tiny_model(seed), tokenizer=tokenizer)

    return save


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, save_tiny) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny")


def tiny_settings(checkpoint: Path, **overrides) -> Settings:
    base = dict(
        checkpoint=str(checkpoint),
        dtype="float32",
        max_batch_size=4,
        max_context=2048,
        max_queue=8,
        reload_interval=0,
        threads=1,
    )
    base.update(overrides)
    return Settings(**base)


@pytest.fixture(scope="session")
def make_client(tiny_checkpoint):
    """Build an app on the tiny checkpoint with settings overrides; a context manager yielding a TestClient."""

    @contextlib.contextmanager
    def make(**overrides) -> Iterator[TestClient]:
        app = create_app(tiny_settings(tiny_checkpoint, **overrides))
        with TestClient(app) as client:
            yield client

    return make


@pytest.fixture(scope="module")
def client(make_client) -> Iterator[TestClient]:
    with make_client() as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server on 127.0.0.1 in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(
            self.app, settings.model_copy(update={"host": "127.0.0.1", "port": self.port, "log_level": "warning"})
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # signals stay with pytest
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_ready(self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self):
        return self.app.state.engine


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


@pytest.fixture(scope="module")
def live(tiny_checkpoint) -> Iterator[LiveServer]:
    with LiveServer(tiny_settings(tiny_checkpoint)) as server:
        yield server


def slow_down(engine, delay: float = 0.01) -> None:
    """Make every engine step take at least `delay` seconds, so a tiny model's request stays running."""
    run = engine.runner.run

    def slow_run(batch):
        time.sleep(delay)
        return run(batch)

    engine.runner.run = slow_run


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def parse_sse(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE body; comment lines (pings) are skipped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            events.append((event, "\n".join(data)))
    return events
