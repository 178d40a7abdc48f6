"""Where our server's time goes: `python -m bench.profile [--concurrency 16] [--dtype bfloat16] [--seconds 15]`.

Two views of the same workload:
- `py-spy` (sampling, whole process, every thread) attached to our server while the load generator drives it:
  the share of samples per thread and the functions with the most self time, written as collapsed stacks
  (`<out>/pyspy-c<N>.txt`, for flamegraph.pl or speedscope) and summarised on stdout;
- `torch.profiler` over the model's batched decode step alone (the engine's hot path, no HTTP), op by op.
`--compile` instead times the eager decode step against the engine's torch.compile'd one (SMOLLM_COMPILE=decode),
interleaved in one process: `python -m bench.profile --compile --dtype float32 [--quant int8] [--batches 1,16]`.
py-spy is optional (`pip install py-spy`); without it only the second view runs.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from bench.loadgen import LoadConfig, run_load_sync
from bench.server import smollm_server
from model.device import DTYPES

log = logging.getLogger("bench.profile")


def summarize_collapsed(path: Path, top: int = 25) -> str:
    """Samples per thread and the `top` leaf frames (self time) of a py-spy `--threads -f raw` file."""
    threads: Counter[str] = Counter()
    leaves: Counter[tuple[str, str]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        threads[frames[0]] += int(count)
        leaves[(frames[0].split(":")[-1].strip(), frames[-1])] += int(count)
    total = sum(threads.values()) or 1
    lines = ["samples by thread:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in threads.most_common()]
    lines.append(f"top {top} frames by self time (% of all samples):")
    lines += [f"  {100 * n / total:5.1f}%  [{thread}] {frame}" for (thread, frame), n in leaves.most_common(top)]
    return "\n".join(lines)


def profile_server(checkpoint: Path, dtype: str, concurrency: int, seconds: float, out: Path) -> str:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).is_file():
        return "py-spy not installed (pip install py-spy): server profile skipped"
    raw = out / f"pyspy-c{concurrency}.txt"
    with smollm_server(checkpoint, dtype, out / f"service-{dtype}.log") as server:
        run_load_sync(LoadConfig(base_url=server.base_url, concurrency=1, requests=1, max_tokens=8))  # warm-up
        spy = subprocess.Popen(
            [
                pyspy,
                "record",
                "-p",
                str(server.proc.pid),
                "-o",
                str(raw),
                "-f",
                "raw",
                "--threads",
                "--nonblocking",
                "-r",
                "100",
                "-d",
                str(int(seconds)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        time.sleep(1.0)  # let py-spy attach before the load starts
        summary = run_load_sync(
            LoadConfig(
                base_url=server.base_url,
                concurrency=concurrency,
                requests=10_000,
                max_tokens=128,
                time_limit=seconds - 2,
                extra_body={"ignore_eos": True},
            )
        )
        spy_out = spy.communicate(timeout=seconds + 60)[0].decode(errors="replace")
    if not raw.is_file():
        return f"py-spy wrote nothing:\n{spy_out[-2000:]}"
    head = (
        f"server under load: c={concurrency} {dtype}: {summary.tokens_per_s:.1f} tok/s, TTFT p50 "
        f"{summary.ttft_p50_ms or 0:.0f} ms, ITL p50 {summary.itl_p50_ms or 0:.1f} ms ({raw})"
    )
    return head + "\n" + summarize_collapsed(raw)


@torch.inference_mode()
def profile_decode(checkpoint: Path, dtype: str, batch: int, context: int, steps: int = 10) -> str:
    """torch.profiler over `steps` batched decode steps of `batch` sequences at position ~`context`."""
    from torch.profiler import ProfilerActivity, profile

    from model.checkpoint import load_model
    from model.kv_cache import CacheBatch
    from model.packed_linear import pack_linears

    model = load_model(checkpoint, dtype=DTYPES[dtype])
    pack_linears(model)  # as the server does (SMOLLM_PACK_WEIGHTS)
    cache = model.new_kv_cache(batch, context + steps + 8)
    slots = list(range(batch))

    def step(pos: int) -> None:
        idx = torch.zeros(batch, 1, dtype=torch.long)
        model(idx, batch=CacheBatch.build(cache, slots, [[pos]] * batch))

    for i in range(3):
        step(context + i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(context + i)
    per_step = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(context + i)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return (
        f"decode step alone: batch {batch}, context {context}, {dtype}: {per_step * 1000:.1f} ms/step = "
        f"{batch / per_step:.0f} tok/s\n{table}"
    )


@torch.inference_mode()
def compare_compiled(
    checkpoint: Path, dtype: str, batch: int, context: int, quant: str = "none", rounds: int = 3, steps: int = 5
) -> str:
    """Milliseconds per batched decode step, eager (plain and oneDNN-packed weights) against the engine's compiled
    step (service/engine/compiled_decode.py, SMOLLM_COMPILE=decode), interleaved round by round in one process so
    a shared machine's load falls on all of them alike; the ratio is of the medians."""
    import copy
    import statistics

    from model.checkpoint import load_model
    from model.kv_cache import CacheBatch
    from model.packed_linear import pack_linears
    from service.engine.compiled_decode import CompiledDecode
    from service.engine.runner import KV_ALIGN

    model = load_model(checkpoint, dtype=DTYPES[dtype])
    if quant != "none":
        from model.quant import quantize_model

        quantize_model(model, quant)
    packed = copy.deepcopy(model)
    pack_linears(packed)
    cache = model.new_kv_cache(batch + 1, context + KV_ALIGN)  # + the compiled step's scratch slot
    slots = list(range(batch))
    kv_len = -(-(context + 1) // KV_ALIGN) * KV_ALIGN  # as the runner rounds it
    compiled = CompiledDecode(model, cache, batch, 0, KV_ALIGN)

    def eager(m: torch.nn.Module) -> Callable[[], object]:
        return lambda: m(
            torch.zeros(batch, 1, dtype=torch.long),
            batch=CacheBatch.build(cache, slots, [[context]] * batch, kv_len=kv_len),
        )

    variants: dict[str, Callable[[], object]] = {
        "eager": eager(model),
        "eager packed": eager(packed),
        "compiled": lambda: compiled([0] * batch, slots, [context] * batch, kv_len),
    }
    t0 = time.perf_counter()
    if variants["compiled"]() is None:
        return f"decode step, batch {batch}: compile failed (see the log)"
    compile_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append(1000 * (time.perf_counter() - t0) / steps)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    lines = [f"decode step, batch {batch}, context {context}, {dtype}, quant {quant}: compile {compile_s:.0f} s"]
    lines += [
        f"  {name:13s} {med[name]:8.1f} ms/step (rounds: {', '.join(f'{t:.0f}' for t in ts)})"
        for name, ts in times.items()
    ]
    lines.append(
        f"  compiled / eager {med['compiled'] / med['eager']:.2f}, compiled / eager packed "
        f"{med['compiled'] / med['eager packed']:.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--context", type=int, default=128, help="position of the decode steps in the torch view")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("bench/results/profile"))
    p.add_argument("--skip-server", action="store_true", help="only the torch.profiler view")
    p.add_argument(
        "--compile",
        action="store_true",
        help="instead of profiling: eager vs the torch.compile'd decode step (SMOLLM_COMPILE=decode), interleaved",
    )
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="none", help="with --compile")
    p.add_argument("--batches", default=None, help="with --compile: comma-separated batch sizes (default 1,16)")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.seconds < 5:
        p.error("--concurrency must be >= 1 and --seconds >= 5")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from model.bundled import default_checkpoint

    checkpoint = args.checkpoint or default_checkpoint()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = []
    if args.compile:
        for batch in [int(b) for b in (args.batches or "1,16").split(",")]:
            parts.append(compare_compiled(checkpoint, args.dtype, batch, args.context, args.quant))
            sys.stdout.write(parts[-1] + "\n")
        return 0
    if not args.skip_server:
        parts.append(profile_server(checkpoint, args.dtype, args.concurrency, args.seconds, args.out))
    for batch in sorted({1, args.concurrency}):
        parts.append(profile_decode(checkpoint, args.dtype, batch, args.context))
    sys.stdout.write("\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
