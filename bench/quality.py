"""`python -m bench.quality`: how much each precision and weight-only quant mode costs in quality.

On a fixed held-out text shipped with the repo (`bench/data/heldout.txt`, prose written for this purpose):
- perplexity over non-overlapping windows of `WINDOW` tokens (each window scored from its own first token on);
- greedy next-token agreement with fp32 over `PROMPTS` prompts cut from the same text: prompt i is the text from
  its window's start up to an evenly spaced position, and its greedy next token is compared with fp32's.

Modes: float32, bfloat16 (plain weights, that compute dtype) and int8/int4 (`model.quant`, on the compute dtype
`auto` picks for this machine). Prints a table naming the machine and writes `bench/results/quality-<stamp>.json`.

`--kv-cache-dtypes float16` also scores each mode through the KV cache as the server runs it: each window
prefilled in chunks of `CACHE_CHUNK` tokens, later chunks attending keys and values read back from a cache of
each dtype given (and of the compute dtype, the reference): what `SMOLLM_KV_CACHE_DTYPE` costs.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.device import DTYPES, dtype_name
from model.kv_cache import KV_CACHE_DTYPES
from model.quant import quantize_model, serving_dtype

log = logging.getLogger("bench.quality")

HELDOUT = Path(__file__).resolve().parent / "data" / "heldout.txt"
WINDOW = 256
PROMPTS = 64
MODES = ("float32", "bfloat16", "int8", "int4")
# Prompt tokens a step prefills in `cached_perplexity` (later chunks read the cache back).
CACHE_CHUNK = 64
# Asserted on the real model (tests/bench/test_quality.py): perplexity increase over fp32 at most this much.
PPL_BOUNDS = {"int8": 0.01, "int4": 0.05}


@dataclass
class ModeQuality:
    mode: str
    compute_dtype: str
    perplexity: float
    agreement: float  # share of the prompts whose greedy next token equals fp32's
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heldout_windows(tokenizer, text: str, window: int = WINDOW) -> torch.Tensor:
    """The text's tokens as complete non-overlapping windows (n, window); a short tail is dropped."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    n = len(ids) // window
    if n < 1:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than one window of {window}")
    return torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)


def prompt_positions(windows: torch.Tensor, prompts: int = PROMPTS) -> list[tuple[int, int]]:
    """(window, last prompt position) for `prompts` prompts spread evenly over all windows, each at least 8
    tokens long."""
    n, window = windows.shape
    flat = torch.linspace(0, n * (window - 8) - 1, prompts).long().tolist()
    return [(i // (window - 8), 7 + i % (window - 8)) for i in flat]


def load_mode(checkpoint: Path, mode: str):
    """The model as `mode` serves it: float32/bfloat16 plain weights; int8/int4 quantized, in the dtype `auto`
    serves them in (`model.quant.serving_dtype`)."""
    from model.checkpoint import load_model

    if mode in DTYPES:
        return load_model(checkpoint, dtype=DTYPES[mode])
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    model = load_model(checkpoint, dtype=serving_dtype("auto", torch.device("cpu"), mode))
    quantize_model(model, mode)
    return model


@torch.inference_mode()
def score(model, windows: torch.Tensor, positions: list[tuple[int, int]]) -> tuple[float, torch.Tensor]:
    """Perplexity over the windows, and the greedy next token at each prompt position (len(positions),)."""
    nll, count, greedy = 0.0, 0, {}
    for w in range(windows.shape[0]):
        idx = windows[w : w + 1]
        logits = model(idx).float()[0]  # (window, vocab)
        nll += F.cross_entropy(logits[:-1], idx[0, 1:], reduction="sum").item()
        count += idx.shape[1] - 1
        for i, (pw, pos) in enumerate(positions):
            if pw == w:
                greedy[i] = int(logits[pos].argmax())
    return math.exp(nll / count), torch.tensor([greedy[i] for i in range(len(positions))])


@torch.inference_mode()
def cached_perplexity(model, windows: torch.Tensor, kv_dtype: torch.dtype, chunk: int = CACHE_CHUNK) -> float:
    """Perplexity over the windows computed through a KV cache of `kv_dtype`: each window a sequence prefilled
    `chunk` tokens at a time, every chunk's logits scored, so that all but the first chunk read keys and values
    back from the cache (as the server's chunked prefill and decode steps do)."""
    from model.kv_cache import CacheBatch

    n, window = windows.shape
    nll, count = 0.0, 0
    for w in range(n):
        cache = model.new_kv_cache(max_slots=1, max_len=window, dtype=kv_dtype)
        for start in range(0, window - 1, chunk):
            end = min(start + chunk, window - 1)  # the last token has nothing to predict
            length = end - start
            batch = CacheBatch.build_packed(
                cache, [(0, length, end)], list(range(start, end)), logits_index=list(range(length))
            )
            logits = model(windows[w : w + 1, start:end], batch=batch).float()
            nll += F.cross_entropy(logits, windows[w, start + 1 : end + 1], reduction="sum").item()
            count += length
    return math.exp(nll / count)


def evaluate(
    checkpoint: Path, modes: list[str], text: str | None = None, kv_dtypes: list[str] | None = None
) -> dict[str, Any]:
    """Quality of each mode; fp32 is always measured first, as the reference for agreement. With `kv_dtypes`,
    also each mode's perplexity through a KV cache of each of them and of its compute dtype (`cached_perplexity`)."""
    import time

    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    windows = heldout_windows(tokenizer, text if text is not None else HELDOUT.read_text())
    positions = prompt_positions(windows)
    out: dict[str, ModeQuality] = {}
    cached: dict[str, dict[str, float]] = {}
    reference = None
    for mode in ["float32", *(m for m in modes if m != "float32")]:
        t0 = time.perf_counter()
        model = load_mode(checkpoint, mode)
        ppl, greedy = score(model, windows, positions)
        if reference is None:
            reference = greedy
        agree = float((greedy == reference).float().mean())
        out[mode] = ModeQuality(mode, dtype_name(model.dtype), ppl, agree, time.perf_counter() - t0)
        log.info("%s: perplexity %.4f, agreement %.3f (%.0f s)", mode, ppl, agree, out[mode].seconds)
        if kv_dtypes:
            names = [dtype_name(model.dtype), *(d for d in kv_dtypes if d != dtype_name(model.dtype))]
            cached[mode] = {name: cached_perplexity(model, windows, KV_CACHE_DTYPES[name]) for name in names}
            log.info("%s through the KV cache: %s", mode, cached[mode])
        del model
    return {
        "tokens": int(windows.numel()),
        "window": windows.shape[1],
        "prompts": len(positions),
        "modes": {m: q.to_dict() for m, q in out.items()},
        **({"cached": {"chunk": CACHE_CHUNK, "perplexity": cached}} if kv_dtypes else {}),
    }


def format_table(results: dict[str, Any]) -> str:
    from bench.machine import machine_line

    q = results["quality"]
    base = q["modes"]["float32"]["perplexity"]
    lines = [
        f"Quality on {results['meta']['text']} ({q['tokens']} tokens in windows of {q['window']}; "
        f"{q['prompts']} prompts) on {machine_line(results['meta']['machine'])}",
        f"{'mode':>9}  {'compute':>9}  {'perplexity':>10}  {'vs fp32':>8}  {'bound':>6}  {'agree':>6}",
    ]
    for mode, m in q["modes"].items():
        bound = PPL_BOUNDS.get(mode)
        lines.append(
            f"{mode:>9}  {m['compute_dtype']:>9}  {m['perplexity']:>10.4f}  "
            f"{100 * (m['perplexity'] / base - 1):>+7.2f}%  "
            f"{'-' if bound is None else f'+{100 * bound:g}%':>6}  {100 * m['agreement']:>5.1f}%"
        )
    if "cached" in q:
        lines.append(f"Through the KV cache (prefill in chunks of {q['cached']['chunk']}): perplexity by cache dtype")
        for mode, by_dtype in q["cached"]["perplexity"].items():
            ref = by_dtype[q["modes"][mode]["compute_dtype"]]
            cells = [f"{name} {ppl:.4f} ({100 * (ppl / ref - 1):+.2f}%)" for name, ppl in by_dtype.items()]
            lines.append(f"{mode:>9}  " + ", ".join(cells))
    return "\n".join(lines)


def _kv_dtype_list(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in KV_CACHE_DTYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown cache dtype {bad[0]!r}; choose from {', '.join(KV_CACHE_DTYPES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument(
        "--kv-cache-dtypes",
        type=_kv_dtype_list,
        default=[],
        help="comma-separated cache dtypes (float32, float16, bfloat16) to score each mode through, besides its own",
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="model (default: the embedded one)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes: choose from {','.join(MODES)}; got {args.modes!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from bench.machine import describe_machine
    from bench.report import write_json
    from model.bundled import default_checkpoint
    from model.checkpoint import CheckpointError

    try:
        checkpoint = args.checkpoint or default_checkpoint()
    except (CheckpointError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    now = datetime.now(UTC)
    results = {
        "meta": {
            "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "checkpoint": str(checkpoint),
            "text": HELDOUT.name,
            "machine": describe_machine(quick=True),
            "command": "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv),
        }
    }
    results["quality"] = evaluate(checkpoint, modes, kv_dtypes=args.kv_cache_dtypes)
    path = write_json(results, args.out / f"quality-{now.strftime('%Y%m%dT%H%M%SZ')}.json")
    sys.stdout.write(format_table(results) + f"\n\nwrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
