"""Opt-in soak: rounds of concurrent streaming clients against a real server for a given time, printing the
reliability figures (requests, errors, tokens, resident memory per round, gauges at the end).

    python -m tests.reliability.soak --minutes 10 --clients 64
    python tests/reliability/soak.py --minutes 2 --clients 16 --checkpoint runs/demo

It starts `python -m service` on a free 127.0.0.1 port (the embedded model unless --checkpoint is given),
stops it at the end, and exits non-zero when a request failed (an error, a cut stream, a token count that
differs from usage.completion_tokens), a slot leaked, or resident memory grew by more than 32 MiB after the
first round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx  # noqa: E402

from tests.reliability.harness import ServerProcess, gauges_idle, load_round, parse_metrics, wait_idle  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.reliability.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="how long to keep the load on (default 5)")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients per round (default 64)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--checkpoint", default=None, help="checkpoint or trainer output dir (default: embedded model)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--url", default=None, help="soak an already running server instead of starting one")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.max_tokens < 1:
        p.error("--minutes, --clients and --max-tokens must be positive")
    return args


def soak(server: ServerProcess | None, url: str, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    rss = [server.rss_kib()] if server else []
    rounds: list[dict] = []
    deadline = time.monotonic() + args.minutes * 60
    while time.monotonic() < deadline:
        r = asyncio.run(load_round(url, args.clients, args.max_tokens, rng, temperature=args.temperature))
        r["round"] = len(rounds) + 1
        if server:
            wait_idle(server)
            rss.append(server.rss_kib())
            r["rss_mib"] = round(rss[-1] / 1024, 1)
        rounds.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "error_samples" or v}), flush=True)
    m = parse_metrics(httpx.get(url + "/metrics", timeout=10).text)
    figures = {
        "clients": args.clients,
        "rounds": len(rounds),
        "max_tokens": args.max_tokens,
        "requests": sum(r["requests"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "tokens": sum(r["tokens"] for r in rounds),
        "tokens_per_s_mean": round(sum(r["tokens_per_s"] for r in rounds) / max(len(rounds), 1), 1),
        "running_after": m.get("smollm_running_sequences"),
        "waiting_after": m.get("smollm_waiting_requests"),
        "leaked_slots": m.get("smollm_kv_cache_slots_used"),
        "idle_after": gauges_idle(m),
    }
    if rss:
        figures["rss_mib_start"] = round(rss[0] / 1024, 1)
        figures["rss_mib_after_first_round"] = round(rss[1] / 1024, 1) if len(rss) > 1 else None
        figures["rss_mib_end"] = round(rss[-1] / 1024, 1)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        figures = soak(None, args.url.rstrip("/"), args)
    else:
        log = Path(tempfile.mkdtemp(prefix="smollm-soak-")) / "server.log"
        settings = dict(
            dtype=args.dtype,
            max_batch_size=args.max_batch_size,
            max_context=args.max_context,
            max_queue=max(64, args.clients),
            reload_interval=0,
        )
        print(f"starting the server (log: {log})", flush=True)
        with ServerProcess(log, args.checkpoint, **settings).start(ready_timeout=600) as server:
            figures = soak(server, server.url, args)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    # The load test's criterion: after the first round, resident memory may move by at most 32 MiB.
    after_first = figures.get("rss_mib_after_first_round")
    leaking = after_first is not None and figures["rss_mib_end"] - after_first > 32.0
    if figures["errors"] or not figures["idle_after"] or leaking:
        print("soak FAILED: errors, a leaked slot or growing memory (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
