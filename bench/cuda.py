"""`python -m bench --device cuda` (or `python -m bench.cuda`): a prepared check for whoever has a GPU, fitting a hard
time budget (8 minutes by default).

Sections, in order, each skipped (and said so) when what is left of the budget cannot cover it:
1. environment: torch and CUDA versions, the GPU, its memory, bf16 support;
2. parity: greedy tokens through the Engine (the serving path) on the device in bf16 against the Engine on the CPU
   in fp32, for a few fixed prompts; bf16 may drift late, so divergence is reported, and the run fails only when
   the first token differs on most prompts;
3. throughput: concurrent greedy sequences (ignore_eos) through the Engine directly, no HTTP, eager and with
   SMOLLM_COMPILE=decode (each level run twice, the second timed, and compared token for token with the eager
   run), with transformers `generate()` on the same device beside it;
4. decode step: one batched decode step eager and through the engine's compiled step (CompiledDecode: static
   shapes, CUDA graphs on CUDA) per batch size, at a fixed key length.

Prints a table and writes a JSON under bench/results/. Exit 2 without a CUDA device, 1 when parity fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from model.device import DTYPES

log = logging.getLogger("bench.cuda")

BUDGET_S = 480.0
PARITY_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
)


class NoCuda(RuntimeError):
    """No usable CUDA device; the message says what torch reports."""


def require_cuda() -> torch.device:
    """The first CUDA device, or NoCuda naming why there is none (a CPU-only torch build, no visible device)."""
    built = f"torch {torch.__version__}, " + (
        f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
    )
    try:
        available = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except RuntimeError as e:  # a broken driver raises here rather than answering False
        raise NoCuda(f"{built}; CUDA initialisation failed: {e}") from None
    if not available:
        raise NoCuda(
            f"{built}; torch.cuda.is_available() is False "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    return torch.device("cuda", 0)


@dataclass
class Budget:
    """Seconds left of a hard total. A section asks `fits(estimate)` before it starts; one that does not fit is
    recorded as skipped with the reason, so a slow GPU gives a shorter report rather than an overrun."""

    total: float
    clock: Callable[[], float] = time.monotonic
    start: float = field(default=0.0)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def left(self) -> float:
        return self.total - (self.clock() - self.start)

    def fits(self, name: str, estimate: float) -> bool:
        left = self.left()
        if estimate <= left:
            return True
        self.skipped.append(
            f"{name}: skipped, needs ~{estimate:.0f} s, {max(left, 0):.0f} s of the {self.total:.0f} s budget left"
        )
        log.warning("%s", self.skipped[-1])
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the device: name, memory, bf16 support (CUDA), or the CPU's ISA."""
    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
            driver_visible_devices=torch.cuda.device_count(),
        )
    else:
        from model.device import cpu_capability

        cap = cpu_capability()
        env.update(gpu=None, isa=cap.isa, bf16=cap.native_bf16)
    return env


@dataclass
class EngineRun:
    """One round of `concurrency` sequences submitted at once and run to the end."""

    tokens: list[list[int]]  # each sequence's generated ids, in submission order
    seconds: float
    ttft_s: list[float]

    @property
    def total_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def run_engine(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    max_tokens: int,
    *,
    max_batch_size: int,
    timeout: float,
    ignore_eos: bool = True,
    compile: str = "off",
) -> EngineRun:
    """Submit every prompt at once to a fresh Engine (greedy; `compile` as SMOLLM_COMPILE), wait for all, and return
    their tokens and timing. Raises TimeoutError when they do not finish within `timeout` seconds."""
    from model.sampling import SamplingParams
    from service.engine import Engine, StreamEvent
    from service.engine import Sequence as Seq
    from service.engine.loop import ModelInfo

    longest = max(len(p) for p in prompts)
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=max_batch_size,
        max_context=longest + max_tokens + 1,
        max_queue=max(64, len(prompts)),
        prefill_chunk=512,
        info=ModelInfo("bench"),
        compile=compile,
    )
    done = threading.Semaphore(0)

    def emit(seq: Seq, event: StreamEvent) -> None:
        if event.finish_reason is not None:
            done.release()

    seqs = [
        Seq(
            prompt_ids=list(p),
            max_tokens=max_tokens,
            params=SamplingParams(temperature=0.0),
            ignore_eos=ignore_eos,
            emit=emit,
        )
        for p in prompts
    ]
    engine.start()
    try:
        t0 = time.monotonic()
        for s in seqs:
            engine.submit(s)
        deadline = t0 + timeout
        for _ in seqs:
            if not done.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                raise TimeoutError(f"{len(prompts)} sequences of {max_tokens} tokens not done in {timeout:.0f} s")
        seconds = max(s.finished_time or t0 for s in seqs) - t0
    finally:
        engine.stop()
    errors = [s.error for s in seqs if s.error]
    if errors:
        raise RuntimeError(f"engine error: {errors[0]}")
    ttft = [s.first_token_time - s.arrival_time for s in seqs if s.first_token_time is not None]
    return EngineRun([list(s.output_ids) for s in seqs], seconds, ttft)


def encode_prompts(tokenizer, texts: Sequence[str], count: int, vocab_size: int) -> list[list[int]]:
    """`count` prompts cycling through `texts`, as ids below `vocab_size` (a tiny test model has fewer ids than
    the tokenizer)."""
    encoded = [[i % vocab_size for i in tokenizer.encode(t, add_special_tokens=False)] for t in texts]
    return [encoded[i % len(encoded)] for i in range(count)]


def greedy_parity(
    model,
    reference,
    tokenizer,
    *,
    max_tokens: int = 32,
    prompts: Sequence[str] = PARITY_PROMPTS,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Greedy tokens of `model` and `reference` through the Engine, per prompt: positions that match, the first
    that does not (None: all match). `ok` is False when the very first token differs on most prompts."""
    ids = encode_prompts(tokenizer, prompts, len(prompts), model.config.vocab_size)
    ours = run_engine(model, tokenizer, ids, max_tokens, max_batch_size=len(ids), timeout=timeout)
    ref = run_engine(reference, tokenizer, ids, max_tokens, max_batch_size=len(ids), timeout=timeout)
    rows = []
    for text, a, b in zip(prompts, ours.tokens, ref.tokens, strict=True):
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        rows.append(
            {
                "prompt": text,
                "tokens": len(a),
                "matching": sum(x == y for x, y in zip(a, b, strict=True)),
                "first_divergence": first,
            }
        )
    first_token_differs = sum(r["first_divergence"] == 0 for r in rows)
    return {
        "max_tokens": max_tokens,
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "model_device": str(model.device),
        "reference_dtype": str(reference.dtype).removeprefix("torch."),
        "reference_device": str(reference.device),
        "prompts": rows,
        "ok": first_token_differs <= len(rows) // 2,
    }


def engine_throughput(
    model,
    tokenizer,
    levels: Sequence[int],
    *,
    max_tokens: int,
    max_batch_size: int,
    budget: Budget,
    prompts: Sequence[str] | None = None,
    compile: str = "off",
    tokens: dict[str, list[list[int]]] | None = None,
    reference: dict[str, list[list[int]]] | None = None,
) -> dict[str, Any]:
    """Tokens/s and TTFT p50 of `c` concurrent greedy sequences of exactly `max_tokens` tokens, per level, through an
    Engine with `compile` (SMOLLM_COMPILE). Allocator and kernel selection stay out of the figures: eager runs one
    small warm-up round first; `compile="decode"` runs each level twice and times the second, since its graphs
    (one per batch and key bucket) compile on first use. Each level's generated ids go into `tokens`; where
    `reference` has the level (the eager run's ids), the row says how many sequences match it exactly."""
    from bench.loadgen import DEFAULT_PROMPTS

    texts = prompts or DEFAULT_PROMPTS
    vocab = model.config.vocab_size
    if compile == "off":
        run_engine(
            model,
            tokenizer,
            encode_prompts(tokenizer, texts, 2, vocab),
            min(4, max_tokens),
            max_batch_size=max_batch_size,
            timeout=max(budget.left(), 1.0),
        )
    out: dict[str, Any] = {}
    # A level costs about what the previous one did, scaled by its steps: a first guess, then measured. Compiling
    # a level's graphs costs far more than running it (26-76 s a graph on an H200's 16 cores).
    estimate = 30.0 if compile == "off" else 150.0
    for c in levels:
        if not budget.fits(f"engine{'' if compile == 'off' else ' compile=' + compile} c={c}", estimate):
            out[str(c)] = {"skipped": budget.skipped[-1]}
            continue
        ids = encode_prompts(tokenizer, texts, c, vocab)
        t0 = time.monotonic()
        for _ in range(1 if compile == "off" else 2):
            r = run_engine(
                model,
                tokenizer,
                ids,
                max_tokens,
                max_batch_size=max_batch_size,
                timeout=max(budget.left(), 1.0),
                compile=compile,
            )
        row: dict[str, Any] = {
            "concurrency": c,
            "tokens": r.total_tokens,
            "seconds": r.seconds,
            "tokens_per_s": r.total_tokens / r.seconds if r.seconds > 0 else None,
            "ttft_p50_ms": 1000 * statistics.median(r.ttft_s) if r.ttft_s else None,
        }
        if tokens is not None:
            tokens[str(c)] = r.tokens
        if reference is not None and str(c) in reference:
            row["same_tokens_as_eager"] = sum(a == b for a, b in zip(r.tokens, reference[str(c)], strict=True))
        out[str(c)] = row
        estimate = (time.monotonic() - t0) + 5 if compile == "off" else 2 * r.seconds + 60
        log.info("engine compile=%s c=%d: %.0f tok/s", compile, c, row["tokens_per_s"] or 0)
    return out


def transformers_anchor(
    checkpoint: Path, device: torch.device, dtype: str, batches: Sequence[int], *, max_tokens: int, budget: Budget
) -> dict[str, Any]:
    """transformers `generate()` on the same device (bench.anchors), per static batch size."""
    from bench.anchors import transformers_generate
    from bench.loadgen import DEFAULT_PROMPTS

    out: dict[str, Any] = {}
    for b in batches:
        if not budget.fits(f"transformers batch {b}", 30.0):
            out[str(b)] = {"skipped": budget.skipped[-1]}
            continue
        try:
            out[str(b)] = transformers_generate(
                checkpoint, dtype, b, max_tokens, DEFAULT_PROMPTS, device=str(device)
            ).to_dict()
        except Exception as e:  # an anchor is optional: say why it failed, keep the rest of the report
            log.exception("transformers generate() batch %d failed", b)
            out[str(b)] = {"skipped": f"failed: {type(e).__name__}: {e}"}
    return out


def decode_step(
    model,
    batch_sizes: Sequence[int],
    *,
    kv_len: int = 256,
    steps: int = 50,
    budget: Budget,
    compile_options: dict[str, Any] | None = None,
    compile_estimate: float = 90.0,
) -> dict[str, Any]:
    """Milliseconds per batched decode step (all rows at position kv_len - 1), eager and through the engine's own
    compiled step (`service.engine.compiled_decode.CompiledDecode`, SMOLLM_COMPILE=decode: static shapes, CUDA
    graphs on CUDA; `compile_options` replaces its options, for tests), per batch size, and whether the compiled
    step picks the same greedy tokens."""
    from service.engine.compiled_decode import compile_options as engine_options

    options = engine_options(model.device) if compile_options is None else compile_options
    out: dict[str, Any] = {"kv_len": kv_len, "steps": steps, "compile_options": options, "sizes": {}}
    for b in batch_sizes:
        out["sizes"][str(b)] = row = _decode_size(model, b, kv_len, steps, budget, options, compile_estimate)
        log.info("decode b=%d: %s", b, row)
    return out


def _decode_size(
    model, b: int, kv_len: int, steps: int, budget: Budget, options: dict[str, Any], compile_estimate: float
) -> dict[str, Any]:
    from model.kv_cache import CacheBatch
    from service.engine.compiled_decode import CompiledDecode

    device = model.device
    row: dict[str, Any] = {}
    if not budget.fits(f"decode step eager b={b}", 10.0):
        return {"skipped": budget.skipped[-1]}
    cache = model.new_kv_cache(max_slots=b + 1, max_len=kv_len)  # slot b: the compiled step's scratch slot
    tokens = [i % model.config.vocab_size for i in range(b)]
    slots, positions = list(range(b)), [kv_len - 1] * b
    idx = torch.tensor(tokens, device=device).view(-1, 1)
    slot_t = torch.tensor(slots, device=device)
    pos_t = torch.tensor(positions, device=device).view(-1, 1)

    def timed(fn: Callable[[], torch.Tensor | None], n: int = steps) -> tuple[float, torch.Tensor | None]:
        for _ in range(3):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            logits = fn()
        _sync(device)
        return 1000 * (time.perf_counter() - t0) / n, logits

    with torch.no_grad():
        row["eager_ms"], eager_logits = timed(
            lambda: model(idx, batch=CacheBatch.decode(cache, slot_t, pos_t, kv_len))[:, 0]
        )
        if not budget.fits(f"decode step compiled b={b}", compile_estimate):
            row["compiled"] = budget.skipped[-1]
            return row
        compiled = CompiledDecode(model, cache, scratch_slot=b, pad_id=0, kv_align=kv_len, options=options)
        t0 = time.perf_counter()
        first = compiled(tokens, slots, positions, kv_len)
        _sync(device)
        if first is None:  # CompiledDecode logged the compiler's traceback and would decode eagerly from now on
            row["compiled"] = "failed: torch.compile raised (the log has the traceback); the engine would run eager"
            return row
        row["compile_s"] = time.perf_counter() - t0
        row["compiled_ms"], compiled_logits = timed(lambda: compiled(tokens, slots, positions, kv_len))
        assert eager_logits is not None and compiled_logits is not None
        row["speedup"] = row["eager_ms"] / row["compiled_ms"]
        row["same_argmax"] = bool(torch.equal(eager_logits.argmax(-1), compiled_logits.argmax(-1)))
        row["max_abs_logit_diff"] = float((eager_logits.float() - compiled_logits.float()).abs().max())
    return row


def run_check(
    checkpoint: Path,
    device: torch.device,
    *,
    dtype: str = "bfloat16",
    budget: Budget,
    parity_tokens: int = 32,
    levels: Sequence[int] = (1, 64, 256),
    compiled_levels: Sequence[int] = (1, 64),
    max_tokens: int = 128,
    max_batch_size: int = 256,
    anchor_batches: Sequence[int] = (1, 64),
    step_sizes: Sequence[int] = (1, 64, 256),
    step_kv_len: int = 256,
    step_steps: int = 50,
    compile_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every section on `device` (the CPU works too, for tests), within `budget`; results as a dict."""
    from model.checkpoint import load_model
    from model.tokenizer import load_tokenizer

    results: dict[str, Any] = {"environment": environment(device)}
    t0 = time.monotonic()
    model = load_model(checkpoint, DTYPES[dtype], device)
    tokenizer = load_tokenizer(checkpoint)
    results["load_s"] = time.monotonic() - t0

    eager_tokens: dict[str, list[list[int]]] = {}

    def parity() -> dict[str, Any]:
        reference = load_model(checkpoint, torch.float32, "cpu")
        return greedy_parity(model, reference, tokenizer, max_tokens=parity_tokens, timeout=max(budget.left(), 1.0))

    sections: list[tuple[str, float, Callable[[], dict[str, Any]]]] = [
        ("parity", 60.0, parity),
        (
            "engine",
            30.0,
            lambda: engine_throughput(
                model,
                tokenizer,
                levels,
                max_tokens=max_tokens,
                max_batch_size=max_batch_size,
                budget=budget,
                tokens=eager_tokens,
            ),
        ),
        (
            "engine_compiled",
            150.0,
            lambda: engine_throughput(
                model,
                tokenizer,
                compiled_levels,
                max_tokens=max_tokens,
                max_batch_size=max_batch_size,
                budget=budget,
                compile="decode",
                reference=eager_tokens,
            ),
        ),
        (
            "transformers",
            30.0,
            lambda: transformers_anchor(
                checkpoint, device, dtype, anchor_batches, max_tokens=max_tokens, budget=budget
            ),
        ),
        (
            "decode_step",
            20.0,
            lambda: decode_step(
                model, step_sizes, kv_len=step_kv_len, steps=step_steps, budget=budget, compile_options=compile_options
            ),
        ),
    ]
    for name, estimate, section in sections:
        if not budget.fits(name, estimate):
            continue
        try:
            results[name] = section()
        except Exception as e:  # one broken section (a hang cut by its timeout, an OOM) must not lose the others
            log.exception("section %s failed", name)
            results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
    results["skipped"] = list(budget.skipped)
    results["seconds"] = budget.total - budget.left()
    return results


def random_checkpoint(source: Path, out: Path, seed: int = 0) -> Path:
    """A checkpoint at `out` with `source`'s config and tokenizer and weights drawn with `seed` (`source` needs
    config.json and the tokenizer files only)."""
    from model.checkpoint import read_config, save_checkpoint
    from model.llama import Transformer
    from model.tokenizer import load_tokenizer

    model = Transformer(read_config(source))
    model.init_weights(seed)
    return save_checkpoint(out, model, tokenizer=load_tokenizer(source))


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_report(results: dict[str, Any]) -> str:
    """The results as a few small text tables."""
    env = results["environment"]
    lines = [
        f"# smollm on {env.get('gpu') or env['device']}: torch {env['torch']}, CUDA {env['cuda']}, "
        f"{_fmt(env.get('memory_gib'))} GiB, bf16 {'yes' if env.get('bf16') else 'no'}",
        f"load {results['load_s']:.1f} s",
    ]
    parity = results.get("parity")
    if parity:
        lines += [
            "",
            f"## greedy parity: {parity['model_device']} {parity['model_dtype']} vs "
            f"{parity['reference_device']} {parity['reference_dtype']} "
            f"({'ok' if parity['ok'] else 'FAILED: first token differs on most prompts'})",
            "| prompt | matching | first divergence |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['prompt'][:40]} | {r['matching']}/{r['tokens']} | {_fmt(r['first_divergence'], 'd')} |"
            for r in parity["prompts"]
        ]
    if results.get("engine") or results.get("engine_compiled") or results.get("transformers"):
        lines += [
            "",
            "## throughput (greedy, exactly max_tokens each)",
            "| what | c / batch | tok/s | TTFT p50 ms |",
            "|---|---|---|---|",
        ]
        for key, what in (("engine", "Engine"), ("engine_compiled", "Engine, SMOLLM_COMPILE=decode")):
            for c, r in (results.get(key) or {}).items():
                same = f" ({r['same_tokens_as_eager']}/{c} sequences = eager)" if "same_tokens_as_eager" in r else ""
                lines.append(
                    f"| {what} | {c} | "
                    + (
                        f"{_fmt(r['tokens_per_s'])}{same} | {_fmt(r['ttft_p50_ms'])} |"
                        if "skipped" not in r
                        else f"{r['skipped']} | |"
                    )
                )
        for b, r in (results.get("transformers") or {}).items():
            lines.append(
                f"| transformers generate() | {b} | "
                + (
                    f"{_fmt(r['tokens_per_s'])} | {_fmt(r['ttft_ms'])} |"
                    if "skipped" not in r
                    else f"{r['skipped']} | |"
                )
            )
    step = results.get("decode_step")
    if step:
        lines += [
            "",
            f"## decode step, kv_len {step['kv_len']} (torch.compile {step['compile_options']})",
            "| batch | eager ms | compiled ms | speedup | compile s | same argmax |",
            "|---|---|---|---|---|---|",
        ]
        for b, r in step["sizes"].items():
            if "skipped" in r:
                lines.append(f"| {b} | {r['skipped']} | | | | |")
            elif "compiled_ms" in r:
                lines.append(
                    f"| {b} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['speedup']:.2f}x | "
                    f"{r['compile_s']:.0f} | {r['same_argmax']} |"
                )
            else:
                lines.append(f"| {b} | {r['eager_ms']:.2f} | {r.get('compiled', '-')} | | | |")
    if results.get("errors"):
        lines += ["", "## errors"] + [f"- {k}: {v}" for k, v in results["errors"].items()]
    if results.get("skipped"):
        lines += ["", "## skipped (time budget)"] + [f"- {s}" for s in results["skipped"]]
    lines.append(f"\ntotal {results['seconds']:.0f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cuda", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="model (default: the embedded one)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check (default 480)")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 tokens, c=1,8, no compile")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="the checkpoint's config and tokenizer with random weights (seed 0), for a machine the weights cannot "
        "reach; speed is the same, parity compares the same random weights",
    )
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error("--budget must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        device = require_cuda()
    except NoCuda as e:
        sys.stderr.write(f"error: no CUDA device: {e}\n")
        return 2
    budget = Budget(args.budget)  # counted from here: the model's first load is part of the check
    from bench import report
    from model.bundled import default_checkpoint

    now = datetime.now(UTC)
    checkpoint = args.checkpoint or default_checkpoint()
    # fp16 where a GPU lacks bf16; fp32 on a CPU (tests), where bf16 is emulated on most machines.
    dtype = "float32" if device.type != "cuda" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    kw: dict[str, Any] = {}
    if args.quick:
        kw = dict(
            levels=(1, 8),
            compiled_levels=(),
            max_tokens=16,
            anchor_batches=(1,),
            step_sizes=(1, 8),
            step_steps=10,
            parity_tokens=8,
            compile_options={"backend": "eager"},
        )
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_weights:
            checkpoint = random_checkpoint(checkpoint, Path(tmp) / "random")
        results = run_check(checkpoint, device, dtype=dtype, budget=budget, **kw)
    results["meta"] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "checkpoint": str(checkpoint),
        "dtype": dtype,
        "budget_s": args.budget,
        "random_weights": args.random_weights,
        "command": "python -m bench.cuda " + " ".join(argv or sys.argv[1:]),
    }
    path = report.write_json(results, args.out / f"{now.strftime('%Y%m%dT%H%M%SZ')}-cuda.json")
    sys.stdout.write(format_report(results) + f"\n\nwrote {path}\n")
    parity = results.get("parity")
    return 1 if parity is not None and not parity["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
