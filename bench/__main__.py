"""`python -m bench`: serving and training speed of smollm next to transformers and llama.cpp, in one run.

Sections (select with --only, drop with --skip): ceiling (machine bandwidth and FLOP/s), serving (our server over
HTTP at each concurrency and dtype), anchors (transformers generate(), llama-cpp-python, llama-server under the same
load), training (our step vs transformers' on the same config), prefix_reuse (second-turn / first-turn TTFT of a
~1,500-token conversation) and structured (the llguidance mask's cost per decode step), the last two through the
engine in-process on the model loaded as the server loads it. Prints a table, writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch

from bench import anchors, prefix_reuse, report, training
from bench.ceiling import measure_ceiling
from bench.loadgen import LoadConfig, run_load_sync
from bench.machine import describe_machine, machine_line
from bench.server import ServerError, ServerProcess, llama_server, smollm_server
from model.device import DTYPES
from model.quant import QUANT_MODES

log = logging.getLogger("bench")

SECTIONS = ("ceiling", "serving", "anchors", "training", "prefix_reuse", "structured")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choice_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [x.strip() for x in text.split(",") if x.strip()]
        bad = [v for v in values if v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return values

    return parse


def _device_parser() -> argparse.ArgumentParser:
    """`--device` alone, read first: the GPU check has arguments of its own, which the CPU run's parser refuses.
    The CPU run's parser takes it as a parent, so `--help` lists it."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: the GPU check instead (bench/cuda.py): every other argument goes to it (--checkpoint, --out, "
        "--quick, --budget, --random-weights; see python -m bench.cuda --help)",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0], parents=[_device_parser()])
    p.add_argument("--quick", action="store_true", help="smoke run: few tokens and requests, tiny training only")
    p.add_argument(
        "--only",
        type=_choice_list(SECTIONS),
        default=list(SECTIONS),
        help=f"comma-separated sections to run ({','.join(SECTIONS)})",
    )
    p.add_argument("--skip", type=_choice_list(SECTIONS), default=[], help="comma-separated sections not to run")
    p.add_argument("--concurrency", type=_int_list, default=None, help="streams per level (default 1,4,16,64)")
    p.add_argument("--dtypes", type=_choice_list(tuple(DTYPES)), default=["bfloat16", "float32"])
    p.add_argument(
        "--quants",
        type=_choice_list(QUANT_MODES),
        default=["int8", "int4"],
        help="weight-only quant modes served besides the plain dtypes (SMOLLM_QUANT, on SMOLLM_DTYPE=auto); "
        "none for no quantized rows",
    )
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 128, --quick 16)")
    p.add_argument(
        "--min-requests",
        type=int,
        default=None,
        help="requests per level at least (default 4; a level sends max(concurrency, this))",
    )
    p.add_argument("--time-limit", type=float, default=240.0, help="seconds per load level at most")
    p.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="serving and llama-server: every request's prompt begins with its own label, so none reuses "
        "another's computed prompt (default: 8 fixed prompts, repeated across the clients)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for llama.cpp, in-process anchors and the in-process sections (default: torch's thread count)",
    )
    p.add_argument(
        "--prefix-tokens",
        type=int,
        default=1500,
        help="prefix_reuse: the first turn's prompt in tokens (the issue's target is for ~1,500)",
    )
    p.add_argument(
        "--structured-tokens",
        type=int,
        default=None,
        help="structured: tokens per constrained request at most (default 48, --quick 24)",
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="model to serve (default: the embedded one)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    args.concurrency = args.concurrency or ([1, 4] if args.quick else [1, 4, 16, 64])
    args.max_tokens = args.max_tokens or (16 if args.quick else 128)
    args.min_requests = args.min_requests or (2 if args.quick else 4)
    args.structured_tokens = args.structured_tokens or (24 if args.quick else 48)
    args.only = [s for s in args.only if s not in args.skip]
    if not args.only:
        p.error("--skip leaves no section to run")
    if args.prefix_tokens < 16 or args.structured_tokens < 2:
        p.error("--prefix-tokens must be >= 16 and --structured-tokens >= 2")
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    if args.time_limit <= 0:
        p.error("--time-limit must be positive")
    return args


def serving_modes(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(result key, SMOLLM_DTYPE, SMOLLM_QUANT) for every served mode: each plain dtype, then each quant mode on
    the dtype `auto` picks for the machine."""
    modes = [(dtype, dtype, "none") for dtype in args.dtypes]
    return modes + [(quant, "auto", quant) for quant in args.quants if quant != "none"]


def _batch_size_stats(base_url: str) -> tuple[float, float] | None:
    """(sum, count) of our server's `smollm_batch_size` histogram, to report the mean batch per level."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(base_url + "/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return None
    total = count = None
    for family in text_string_to_metric_families(text):
        if family.name == "smollm_batch_size":
            for s in family.samples:
                if s.name.endswith("_sum"):
                    total = s.value
                elif s.name.endswith("_count"):
                    count = s.value
    return None if total is None or count is None else (total, count)


def supports_ignore_eos(base_url: str) -> bool:
    """Whether our server's /v1/generate takes `ignore_eos` (read from its OpenAPI schema)."""
    try:
        schema = httpx.get(base_url + "/openapi.json", timeout=10.0).json()
        return "ignore_eos" in schema["components"]["schemas"]["GenerateRequest"]["properties"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def served_precision(base_url: str) -> dict[str, str] | None:
    """How our server says it computes (`/v1/models`' `smollm` object: dtype, quant, KV cache dtype, CPU ISA), so
    that a result names what `auto` resolved to; None where the server does not say."""
    try:
        info = httpx.get(base_url + "/v1/models", timeout=10.0).json()["data"][0].get("smollm")
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return None
    return info if isinstance(info, dict) else None


def drive(
    server: ServerProcess,
    args: argparse.Namespace,
    api: str,
    extra_body: dict[str, Any] | None = None,
    metrics: bool = False,
) -> dict[str, Any]:
    """Warm the server up, then run every load level against it; results keyed by concurrency (str)."""
    extra = extra_body or {}
    base = dict(
        base_url=server.base_url,
        api=api,
        max_tokens=args.max_tokens,
        extra_body=extra,
        time_limit=args.time_limit,
        request_timeout=args.time_limit,
    )
    warm = run_load_sync(LoadConfig(**{**base, "max_tokens": min(8, args.max_tokens)}, concurrency=1, requests=1))
    base["distinct_prompts"] = args.distinct_prompts  # after the warm-up: no level's prompt is in a slot before it
    if warm.errors:
        log.warning("%s: warm-up request failed: %s", server.name, warm.error_samples)
    levels: dict[str, Any] = {}
    for c in args.concurrency:
        before = _batch_size_stats(server.base_url) if metrics else None
        summary = run_load_sync(LoadConfig(**base, concurrency=c, min_requests=args.min_requests)).to_dict()
        after = _batch_size_stats(server.base_url) if metrics else None
        if before and after and after[1] > before[1]:
            summary["mean_batch_size"] = (after[0] - before[0]) / (after[1] - before[1])
        levels[str(c)] = summary
        log.info("%s c=%d: %.1f tok/s", server.name, c, summary["tokens_per_s"])
    return levels


def run_serving(args: argparse.Namespace, checkpoint: Path, logs: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, dtype, quant in serving_modes(args):
        server = smollm_server(
            checkpoint, dtype, logs / f"service-{key}.log", max_queue=max(64, max(args.concurrency)), quant=quant
        )
        try:
            with server:
                # Exactly max_tokens per request, like the anchors, when the server can; otherwise the prompts
                # are open-ended enough to run on (the table's tok/req shows what happened).
                extra = {"ignore_eos": True} if supports_ignore_eos(server.base_url) else {}
                out[key] = {
                    "ours": drive(server, args, "smollm", extra, metrics=True),
                    "ignore_eos": bool(extra),
                    "dtype": dtype,
                    "quant": quant,
                    "served": served_precision(server.base_url),
                }
        except ServerError as e:
            log.error("%s", e)
            out[key] = {"ours": {"skipped": str(e).splitlines()[0] + f" (see {server.log_path})"}}
    return out


def _anchor(name: str, fn, *a, **kw) -> dict[str, Any]:
    """Run one optional anchor; any failure becomes a `skipped` entry that names the reason."""
    try:
        return fn(*a, **kw)
    except anchors.AnchorUnavailable as e:
        log.warning("%s anchor not run: %s", name, e)
        return {"skipped": str(e)}
    except Exception as e:  # an anchor is an optional extra: report why it failed, keep benchmarking ours
        log.exception("%s anchor failed", name)
        return {"skipped": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def run_anchors(args: argparse.Namespace, checkpoint: Path, logs: Path, threads: int) -> dict[str, Any]:
    from bench.loadgen import DEFAULT_PROMPTS
    from model.bundled import bundled_gguf_path

    out: dict[str, Any] = {"versions": anchors.versions(), "transformers": {}}
    batch1_runs = 1 if args.quick else 2
    for dtype in args.dtypes:
        out["transformers"][dtype] = _anchor(
            "transformers",
            lambda d=dtype: {
                "batch1": anchors.transformers_generate(
                    checkpoint, d, 1, args.max_tokens, DEFAULT_PROMPTS, runs=batch1_runs
                ).to_dict(),
                "batch16": anchors.transformers_generate(checkpoint, d, 16, args.max_tokens, DEFAULT_PROMPTS).to_dict(),
            },
        )
    gguf = bundled_gguf_path()
    out["llama_cpp_python"] = _anchor(
        "llama-cpp-python",
        lambda: anchors.llama_cpp_python_stream(
            gguf, args.max_tokens, DEFAULT_PROMPTS, runs=batch1_runs, threads=threads
        ).to_dict(),
    )

    def server_levels() -> dict[str, Any]:
        binary = anchors.find_llama_server()
        ctx = 512 if args.max_tokens <= 384 else args.max_tokens + 128
        server = llama_server(binary, gguf, logs / "llama-server.log", parallel=16, threads=threads, ctx_per_slot=ctx)
        with server:
            # ignore_eos: every request produces max_tokens, like the transformers anchor.
            return {
                "binary": str(binary),
                "parallel": 16,
                "threads": threads,
                "levels": drive(server, args, "openai", {"ignore_eos": True}),
            }

    out["llama_server"] = _anchor("llama-server", server_levels)
    return out


def run_engine_sections(args: argparse.Namespace, checkpoint: Path, threads: int) -> dict[str, Any]:
    """The in-process sections asked for (prefix_reuse, structured), on the model loaded as the server loads it
    (SMOLLM_DTYPE=auto, weights packed for oneDNN), with `threads` torch threads: results keyed by section, each
    `skipped` with the reason when it could not run."""
    from service.loading import make_loader, resolve_precision
    from service.settings import Settings

    wanted = [s for s in ("prefix_reuse", "structured") if s in args.only]
    torch.set_num_threads(threads)
    try:
        settings = Settings(checkpoint=str(checkpoint), dtype="auto", reload_interval=0)
        model, tokenizer = make_loader(settings, resolve_precision(settings))(checkpoint)
    except Exception as e:  # the other sections' results still count
        log.exception("could not load %s in-process", checkpoint)
        return {s: {"skipped": f"model not loaded: {type(e).__name__}: {e}"} for s in wanted}
    out: dict[str, Any] = {}
    if "prefix_reuse" in wanted:
        out["prefix_reuse"] = _anchor(
            "prefix_reuse",
            prefix_reuse.measure,
            model,
            tokenizer,
            prompt_tokens=args.prefix_tokens,
            runs=1 if args.quick else 3,
        )
    if "structured" in wanted:
        # Imported here: llguidance is a serving dependency the GPU check (`--device cuda`) does not need.
        from bench import structured

        out["structured"] = _anchor(
            "structured", structured.measure, model, tokenizer, max_tokens=args.structured_tokens
        )
    return out


def main(argv: list[str] | None = None) -> int:
    device, rest = _device_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    if device.device == "cuda":
        from bench import cuda

        return cuda.main(rest)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from model.bundled import bundled_gguf_path, default_checkpoint
    from model.checkpoint import CheckpointError, read_config

    now = datetime.now(UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    logs = args.out / f"{stamp}-logs"
    try:
        checkpoint = args.checkpoint or default_checkpoint()
        config = read_config(checkpoint)
    except (CheckpointError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    threads = args.threads or torch.get_num_threads()
    # The machine (ISA, bandwidth, FLOP/s) goes with every result; the ceiling section measures the latter two
    # more thoroughly, so they are only measured here when it does not run.
    machine = describe_machine(measure="ceiling" not in args.only, quick=True)
    results: dict[str, Any] = {
        "meta": {
            "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
            "checkpoint": str(checkpoint),
            "max_tokens": args.max_tokens,
            "distinct_prompts": args.distinct_prompts,
            "concurrency": args.concurrency,
            "dtypes": args.dtypes,
            "quants": args.quants,
            "threads": threads,
            "quick": args.quick,
            "sections": args.only,
        }
    }

    if "ceiling" in args.only:
        try:
            gguf_bytes = bundled_gguf_path().stat().st_size
        except FileNotFoundError:
            gguf_bytes = None
        ceiling = measure_ceiling(config, args.dtypes, quick=args.quick, gguf_bytes=gguf_bytes, quants=args.quants)
        results["ceiling"] = ceiling.to_dict()
        machine["bandwidth_gbs"], machine["matmul_gflops"] = ceiling.bandwidth_gbs, dict(ceiling.matmul_gflops)
    results["meta"]["machine"] = machine_line(machine)
    results["meta"]["machine_record"] = machine
    if "serving" in args.only:
        results["serving"] = run_serving(args, checkpoint, logs)
    if "anchors" in args.only:
        results["anchors"] = run_anchors(args, checkpoint, logs, threads)
    if "training" in args.only:
        peak = {d: g * 1e9 for d, g in results.get("ceiling", {}).get("matmul_gflops", {}).items()}
        results["training"] = _anchor("training", training.run_training, quick=args.quick, peak_flops=peak)
    if "prefix_reuse" in args.only or "structured" in args.only:
        results.update(run_engine_sections(args, checkpoint, threads))

    json_path = report.write_json(results, args.out / f"{stamp}.json")
    text = report.format_report(results)
    if "serving" in results or "anchors" in results:
        try:
            png = report.plot(results, args.out / f"{stamp}.png")
            text += f"\n\nwrote {json_path} and {png}"
        except ImportError as e:
            text += f"\n\nwrote {json_path}; no plot ({e}: pip install matplotlib)"
    else:
        text += f"\n\nwrote {json_path}"
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
