"""Anchors measured in the same run as our figures, so that ratios survive the drift of a shared machine.

- ``transformers``: ``LlamaForCausalLM.generate()`` (greedy) on the same converted checkpoint and dtype, batch 1
  and a static batch, every row forced to produce exactly ``max_new_tokens`` (``min_new_tokens``).
- ``llama-cpp-python``: one stream on the bundled GGUF (the Q4_1 weights our checkpoint was converted from).
- ``llama-server``: llama.cpp's own server on that GGUF, driven by our load generator (see ``bench.__main__``).

The anchors are optional: each one that cannot run says why (:class:`AnchorUnavailable`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from model.device import DTYPES

log = logging.getLogger(__name__)

DEPS_DIR = Path(__file__).resolve().parent / ".deps"
INSTALL_HINT = "run `bench/deps.sh` (make bench-deps)"


class AnchorUnavailable(RuntimeError):
    """An optional anchor cannot run here; the message says why and how to get it."""


@dataclass
class GenerateResult:
    """A generation anchor: `batch` sequences, each producing `new_tokens` tokens (summed over `runs`)."""

    batch: int
    runs: int
    new_tokens: int  # generated tokens in total over all rows and runs
    seconds: float
    tokens_per_s: float
    ttft_ms: float | None  # prompt pass + first token, batch as a whole

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batch_prompts(prompts: Sequence[str], batch: int) -> list[str]:
    return [prompts[i % len(prompts)] for i in range(batch)]


def transformers_generate(
    checkpoint: Path,
    dtype: str,
    batch: int,
    max_new_tokens: int,
    prompts: Sequence[str],
    runs: int = 1,
    device: str = "cpu",
) -> GenerateResult:
    """Greedy `generate()` of `batch` prompts (left-padded) on `device`, `runs` times with different prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[dtype]).to(device).eval()

    def run(texts: list[str], new_tokens: int) -> tuple[int, float]:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        seconds = time.perf_counter() - t0
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(texts), seconds

    run(_batch_prompts(prompts, batch), 4)  # warm-up: allocator, kernel selection
    _, ttft = run(_batch_prompts(prompts, batch), 1)
    total_tokens, total_s = 0, 0.0
    for r in range(runs):
        texts = _batch_prompts(list(prompts[r:]) + list(prompts[:r]), batch)
        n, s = run(texts, max_new_tokens)
        total_tokens += n
        total_s += s
    return GenerateResult(batch, runs, total_tokens, total_s, total_tokens / total_s, ttft * 1000)


def llama_cpp_python_stream(
    gguf: Path,
    max_tokens: int,
    prompts: Sequence[str],
    runs: int,
    threads: int,
) -> GenerateResult:
    """One stream through llama-cpp-python, `runs` prompts one after the other, end-of-sequence suppressed so
    each produces `max_tokens` tokens."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise AnchorUnavailable(f"llama-cpp-python is not installed ({e}); {INSTALL_HINT}") from None

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)

    def stream(prompt: str, n: int) -> tuple[int, float, float]:
        # The token-level generator: exact token counts, greedy (temp 0), and it runs on past the
        # end-of-sequence token, like llama-server's ignore_eos.
        ids = llm.tokenize(prompt.encode(), add_bos=False)
        t0 = time.perf_counter()
        first, count = None, 0
        for _ in llm.generate(ids, temp=0.0, reset=True):
            count += 1
            first = first or time.perf_counter()
            if count == n:
                break
        return count, (first or time.perf_counter()) - t0, time.perf_counter() - t0

    stream(prompts[0], 4)  # warm-up
    total_tokens, total_s, ttfts = 0, 0.0, []
    for r in range(runs):
        n, ttft, seconds = stream(prompts[r % len(prompts)], max_tokens)
        total_tokens += n
        total_s += seconds
        ttfts.append(ttft)
    return GenerateResult(1, runs, total_tokens, total_s, total_tokens / total_s, 1000 * sum(ttfts) / len(ttfts))


def find_llama_server() -> Path:
    """`$LLAMA_SERVER`, else bench/.deps/bin/llama-server (built by deps.sh), else `llama-server` on PATH."""
    candidates = [os.environ.get("LLAMA_SERVER"), str(DEPS_DIR / "bin" / "llama-server"), shutil.which("llama-server")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise AnchorUnavailable(f"llama-server not found (LLAMA_SERVER, {DEPS_DIR / 'bin'}, PATH); {INSTALL_HINT}")


def versions() -> dict[str, str]:
    """Versions of the anchors' software, for the results' metadata ("missing" where absent)."""
    out = {}
    for dist in ("transformers", "llama-cpp-python"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    try:
        proc = subprocess.run([str(find_llama_server()), "--version"], capture_output=True, text=True, timeout=30)
        out["llama-server"] = (proc.stdout + proc.stderr).strip().splitlines()[0]
    except (AnchorUnavailable, OSError, IndexError, subprocess.TimeoutExpired):
        out["llama-server"] = "missing"
    return out
