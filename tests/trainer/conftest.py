"""Shared fixtures: the bundled tokenizer, a small text corpus and a tiny-model job config in tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from model.bundled import default_checkpoint
from model.tokenizer import load_tokenizer
from trainer.config import TrainConfig, build_config
from trainer.progress import METRICS_FILE, read_metrics

REPO = Path(__file__).resolve().parents[2]

_WORDS = (
    "the quick brown fox jumps over the lazy dog while a small model learns to predict "
    "the next token of every line in this tiny corpus"
).split()


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    return default_checkpoint()


@pytest.fixture(scope="session")
def tokenizer(bundled_dir):
    return load_tokenizer(bundled_dir)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Eight short, repetitive text files (a few thousand tokens): easy to overfit."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        lines = [" ".join(_WORDS[(i + j) % len(_WORDS) :] + _WORDS[: (i + j) % len(_WORDS)]) for j in range(12)]
        (root / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture
def base_raw(corpus, token_cache) -> dict[str, Any]:
    """A tiny job: seconds per run, deterministic, fp32 on the CPU, no MFU probe, no plot."""
    return {
        "model": "tiny",
        "init_from": "scratch",
        "data": {"sources": [str(corpus)], "seq_len": 32, "val_fraction": 0.0, "cache_dir": str(token_cache)},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine", "min_lr": 3e-4},
        "batch_size": 4,
        "grad_accum": 1,
        "max_steps": 8,
        "checkpoint_every": 4,
        "keep_last": 3,
        "eval_every": 0,
        "sample_every": 0,
        "log_every": 1,
        "dtype": "float32",
        "device": "cpu",
        "peak_tflops": 1.0,
        "plot": False,
        "seed": 7,
    }


@pytest.fixture
def make_config(base_raw):
    def make(*overrides: str) -> TrainConfig:
        return build_config(base_raw, list(overrides))

    return make


@pytest.fixture
def config_file(base_raw, tmp_path):
    """Write the tiny job config as YAML (for the CLI), with overrides applied to the raw mapping."""

    def write(*overrides: str, name: str = "job.yaml") -> Path:
        cfg = build_config(base_raw, list(overrides))
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        return path

    return write


def _losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / METRICS_FILE) if "loss" in r}


@pytest.fixture(scope="session")
def losses():
    """Training loss by step from OUT/metrics.jsonl."""
    return _losses


@pytest.fixture(scope="session")
def run_cli():
    """Run `python -m <module> args...` from the repository root; returns the CompletedProcess."""

    def run(args: list[str], module: str = "trainer", env: dict[str, str] | None = None, timeout: float = 300):
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
