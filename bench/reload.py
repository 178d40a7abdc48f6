"""Hot reload under load: the TTFT of short requests while a new checkpoint is swapped in under long streams.

    .venv/bin/python -m bench.reload [--streams 16] [--stream-tokens 384] [--phase-s 20] [--checkpoint DIR]

The server serves a trainer-style output directory (`model.run_dir`: `step-*` dirs and `latest`) holding a copy
of the checkpoint (default: the embedded SmolLM2-135M-Instruct) and watches it. `streams` clients each keep one
long greedy stream running (`ignore_eos`, `stream_tokens` tokens, a new one as soon as one ends). Meanwhile
short probe requests (`probe_tokens` tokens) start every `probe_interval` seconds, open loop, and their TTFT is
recorded:

1. baseline: `phase_s` seconds of probes, no reload;
2. reload: a copy of the same weights is published as the next step (renamed into place, `latest` rewritten,
   as the trainer does), so the watcher loads it, the engine drains for up to SMOLLM_DRAIN_TIMEOUT and then moves
   the running streams to the new model by recomputing their KV cache; probes run for `phase_s` seconds, longer
   if the reload has not ended by then.

The reload window is from the publication until every stream that was running at the swap has received its next
token (the recompute is done); the target (issue #12) compares the TTFT p50 of the probes sent inside it with
the baseline's: at most 2x, and no request fails. The swap is profiled from the server's log (pick-up, load and
check, drain, swap) and from the streams (how long they stalled across the swap). Results: a table on stdout and
`bench/results/<UTC timestamp>-reload.json` with the machine record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import report
from bench.loadgen import iter_sse, percentile
from bench.machine import describe_machine, machine_line
from bench.server import ServerProcess, free_port
from model.run_dir import step_dir_name, write_latest

log = logging.getLogger(__name__)

PROBE_PROMPT = "Write one sentence about the sea."
STREAM_PROMPTS = (
    "The history of the Roman Empire is a long story. It begins",
    "Chapter 1. The old lighthouse keeper had lived alone on the island for",
    "Here is a detailed guide to growing tomatoes in your garden. First,",
    "A travel diary: Day 1. We arrived in Lisbon early in the morning and",
)
TARGET_RATIO = 2.0  # issue #12: TTFT p50 during a reload <= 2x the TTFT without one


@dataclass(frozen=True)
class ReloadBenchConfig:
    """One run's sizes. `drain_timeout` None keeps the server's default (SMOLLM_DRAIN_TIMEOUT)."""

    checkpoint: Path | None = None  # default: the embedded model
    dtype: str = "auto"
    threads: int | None = None
    streams: int = 16
    stream_tokens: int = 384
    probe_tokens: int = 8
    probe_interval: float = 0.5
    phase_s: float = 20.0
    max_reload_s: float = 120.0  # give up on a reload that has not ended this long after publication
    reload_interval: float = 0.2
    drain_timeout: float | None = None
    request_timeout: float = 300.0

    def __post_init__(self) -> None:
        for name in ("streams", "stream_tokens", "probe_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("probe_interval", "phase_s", "max_reload_s", "reload_interval", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.drain_timeout is not None and self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")


@dataclass
class Request:
    """One streaming request as the client saw it; times are wall-clock seconds (time.time), to line up with
    the server's log."""

    kind: str  # "stream" or "probe"
    start: float
    token_times: list[float] = field(default_factory=list)
    end: float | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None


async def stream_request(client: httpx.AsyncClient, body: dict[str, Any], req: Request) -> None:
    """POST /v1/generate with stream: true, filling `req` as events arrive; a failure is recorded, never raised
    (cancellation excepted: a stream still open when the run ends is neither finished nor failed)."""
    try:
        async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as resp:
            if resp.status_code != 200:
                req.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return
            async for event, data in iter_sse(resp.aiter_lines()):
                if event == "token":
                    req.token_times.append(time.time())
                elif event == "done":
                    req.finish_reason = json.loads(data).get("finish_reason")
                    return
                elif event == "error":
                    req.error = f"error event: {data[:200]}"
                    return
            req.error = "stream ended without a done event"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        req.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        req.end = time.time()


def ttft_summary(probes: list[Request]) -> dict[str, Any]:
    """Count, failures and TTFT p50/p99 (ms) of probes."""
    ttfts = [r.ttft for r in probes if r.ttft is not None and r.error is None]
    p50, p99 = percentile(ttfts, 50), percentile(ttfts, 99)
    return {
        "probes": len(probes),
        "failed": sum(r.error is not None for r in probes),
        "ttft_p50_ms": None if p50 is None else p50 * 1e3,
        "ttft_p99_ms": None if p99 is None else p99 * 1e3,
        "ttft_max_ms": max(ttfts) * 1e3 if ttfts else None,
    }


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")


def reload_timeline(log_text: str, step_name: str) -> dict[str, Any]:
    """Wall-clock times of the reload of `step_name` from the server's INFO log: picked up by the watcher,
    loaded and checked, swapped in (end of the drain), and how many running sequences were moved."""
    out: dict[str, Any] = {}
    for line in log_text.splitlines():
        m = _LOG_TIME.match(line)
        if m is None:
            continue
        # The log's asctime is local time with milliseconds.
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        msg = m.group(2)
        if msg.startswith("loading new checkpoint") and msg.endswith(step_name):
            out["picked_up"] = t
        elif msg.startswith("loaded and checked") and step_name in msg:
            out["loaded"] = t
        elif (mv := re.match(r"moved (\d+) running sequences", msg)) and "loaded" in out and "swapped" not in out:
            out["moved"] = int(mv.group(1))
        elif msg.startswith("now serving") and step_name in msg:
            out["swapped"] = t
            if sw := re.search(r"swap ([\d.]+) s", msg):
                out["swap_s"] = float(sw.group(1))
    out.setdefault("moved", 0)
    return out


def swap_profile(timeline: dict[str, Any], published: float, streams: list[Request]) -> dict[str, Any]:
    """Durations (s) of each part of the reload, and the longest stall of a stream across the swap (the
    recompute of its KV cache on the new model, plus its share of everyone else's)."""
    prof: dict[str, Any] = {"moved": timeline.get("moved", 0)}
    picked, loaded, swapped = (timeline.get(k) for k in ("picked_up", "loaded", "swapped"))
    if picked is not None:
        prof["pick_up_s"] = picked - published
    if picked is not None and loaded is not None:
        prof["load_s"] = loaded - picked
    if loaded is not None and swapped is not None:
        # The engine logs when the swap ended and how long it took (clearing the KV cache, moving the running).
        prof["swap_s"] = timeline.get("swap_s", 0.0)
        prof["drain_s"] = swapped - prof["swap_s"] - loaded
    if swapped is not None:
        prof["publish_to_swap_s"] = swapped - published
        stalls, resumed = [], []
        for r in streams:
            before = [t for t in r.token_times if t <= swapped]
            after = [t for t in r.token_times if t > swapped]
            if before and after and len(before) < len(r.token_times):
                stalls.append(after[0] - before[-1])
                resumed.append(after[0])
        if stalls:
            prof["stream_stall_max_s"] = max(stalls)
            prof["stream_stall_p50_s"] = percentile(stalls, 50)
            prof["recompute_done_s"] = max(resumed) - swapped
    return prof


def _percent_line(name: str, s: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    return (
        f"{name:<22} {s['probes']:>6} {s['failed']:>6} {f(s['ttft_p50_ms']):>9} {f(s['ttft_p99_ms']):>9} "
        f"{f(s['ttft_max_ms']):>9}"
    )


def format_report(results: dict[str, Any]) -> str:
    meta, prof = results["meta"], results["swap"]
    lines = [
        f"hot reload under load, {meta['date']} on {meta['machine']}",
        f"command: {meta['command']}",
        f"model {meta['checkpoint']} ({results['dtype']}), {results['config']['streams']} streams of "
        f"{results['config']['stream_tokens']} tokens, probes of {results['config']['probe_tokens']} tokens every "
        f"{results['config']['probe_interval']:g} s",
        "",
        f"{'probes':<22} {'sent':>6} {'failed':>6} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}",
        _percent_line("baseline (no reload)", results["baseline"]),
        _percent_line("reload phase", results["reload_phase"]),
        _percent_line("reload window", results["reload_window"]),
        "",
    ]

    def s(key: str) -> str:
        return f"{prof[key]:.2f} s" if prof.get(key) is not None else "-"

    lines.append(
        f"swap: picked up {s('pick_up_s')} after publication, load+check {s('load_s')}, drain {s('drain_s')}, "
        f"swap {s('swap_s')}, {prof.get('moved', 0)} streams moved, longest stream stall "
        f"{s('stream_stall_max_s')}, recompute done {s('recompute_done_s')} after the swap; "
        f"reload window {results['reload_window_s']:.2f} s"
    )

    def r(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    lines.append(
        f"TTFT p50 ratio (reload window / baseline): {r(results['ratio_p50'])} (target <= {TARGET_RATIO:g}); "
        f"whole reload phase: {r(results['ratio_p50_phase'])}; failed requests: {results['failed_requests']}; "
        f"target met: {results['target_met']}"
    )
    if results["error_samples"]:
        lines += ["errors:"] + [f"  {e}" for e in results["error_samples"]]
    return "\n".join(lines)


class _Load:
    """The long streams: each client keeps one running until `stop`."""

    def __init__(self, client: httpx.AsyncClient, cfg: ReloadBenchConfig) -> None:
        self.client, self.cfg = client, cfg
        self.requests: list[Request] = []
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.cfg.streams)]

    async def _client(self, i: int) -> None:
        body = {
            "prompt": STREAM_PROMPTS[i % len(STREAM_PROMPTS)],
            "max_tokens": self.cfg.stream_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        while not self._stopping:
            req = Request("stream", time.time())
            self.requests.append(req)
            await stream_request(self.client, body, req)

    def running(self) -> int:
        return sum(1 for r in self.requests if r.token_times and r.end is None)

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _probes(client: httpx.AsyncClient, cfg: ReloadBenchConfig, until) -> list[Request]:
    """Start a probe every `probe_interval` s while `until()` is false; returns them all once they ended."""
    body = {"prompt": PROBE_PROMPT, "max_tokens": cfg.probe_tokens, "temperature": 0.0, "ignore_eos": True}
    probes: list[Request] = []
    tasks = []
    next_at = time.monotonic()
    while not until():
        req = Request("probe", time.time())
        probes.append(req)
        tasks.append(asyncio.create_task(stream_request(client, body, req)))
        next_at += cfg.probe_interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*tasks)
    return probes


async def _serving(client: httpx.AsyncClient, name: str) -> bool:
    try:
        models = (await client.get("/v1/models", timeout=5)).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return any(m.get("id") == name for m in models)


async def _drive(server: ServerProcess, cfg: ReloadBenchConfig, run: Path, staged: Path, step: str) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=cfg.streams + 256, max_keepalive_connections=cfg.streams + 64)
    timeout = httpx.Timeout(cfg.request_timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=timeout) as client:
        load = _Load(client, cfg)
        load.start()
        try:
            deadline = time.monotonic() + cfg.request_timeout
            while load.running() < cfg.streams:  # every stream has its first token: the load is on
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {load.running()} of {cfg.streams} streams started")
                if any(r.error for r in load.requests):
                    break  # counted as failures below
                await asyncio.sleep(0.1)
            log.info("%d streams running; baseline probes for %.0f s", load.running(), cfg.phase_s)
            end = time.monotonic() + cfg.phase_s
            baseline = await _probes(client, cfg, lambda: time.monotonic() >= end)

            # Publish the next step as the trainer does: the complete directory renamed into place, then `latest`.
            published = time.time()
            staged.rename(run / step)
            write_latest(run, step)
            log.info("published %s; reload probes", step)
            state: dict[str, float] = {}

            async def watch_swap() -> None:
                while not await _serving(client, step):
                    await asyncio.sleep(0.05)
                state["seen"] = time.time()

            watcher = asyncio.create_task(watch_swap())
            start = time.monotonic()

            def reload_phase_over() -> bool:
                elapsed = time.monotonic() - start
                if elapsed > cfg.max_reload_s:
                    return True
                # At least phase_s, and on until the swap is visible and every stream open then got a token since
                # (its KV cache was recomputed on the new model), plus a few probes more.
                seen = state.get("seen")
                if elapsed < cfg.phase_s or seen is None:
                    return False
                if "resumed" not in state and all(
                    r.end is not None or (r.token_times and r.token_times[-1] > seen)
                    for r in load.requests
                    if r.start < seen
                ):
                    state["resumed"] = time.time()
                return "resumed" in state and time.time() - state["resumed"] > 4 * cfg.probe_interval

            during = await _probes(client, cfg, reload_phase_over)
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            if "seen" not in state:
                raise RuntimeError(
                    f"the server did not serve {step} within {cfg.max_reload_s:g} s; see {server.log_path}"
                )
        finally:
            await load.stop()
        metrics = (await client.get("/metrics", timeout=10)).text
    return {
        "baseline": baseline,
        "during": during,
        "streams": load.requests,
        "published": published,
        "seen": state["seen"],
        "metrics": metrics,
    }


def _reload_failures(metrics: str) -> int:
    total = 0
    for line in metrics.splitlines():
        if line.startswith("smollm_reload_failures_total{"):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def run_reload_bench(cfg: ReloadBenchConfig, workdir: Path, log_path: Path) -> dict[str, Any]:
    """Run both phases against a fresh server on a copy of the checkpoint under `workdir`; the results dict
    (what the JSON holds, without `meta`). Raises RuntimeError when no swap happened."""
    from model.bundled import default_checkpoint

    source = cfg.checkpoint or default_checkpoint()
    run = workdir / "run"
    run.mkdir(parents=True)
    first, second = step_dir_name(1), step_dir_name(2)
    shutil.copytree(source, run / first)
    write_latest(run, first)
    # The next step is copied now, outside the measurement, hidden (a `.`-name the watcher never reads).
    staged = run / f".{second}.tmp-bench"
    shutil.copytree(source, staged)
    env = {
        "SMOLLM_DTYPE": cfg.dtype,
        "SMOLLM_RELOAD_INTERVAL": str(cfg.reload_interval),
        # Every stream and the probes in flight get a slot: probes measure the reload, not a full cache.
        "SMOLLM_MAX_BATCH_SIZE": str(cfg.streams + max(4, int(4 / cfg.probe_interval))),
        "SMOLLM_MAX_QUEUE": "256",
        "SMOLLM_REQUEST_TIMEOUT": str(cfg.request_timeout),
        "SMOLLM_LOG_LEVEL": "INFO",  # the reload timeline is read from the log
    }
    if cfg.threads is not None:
        env["SMOLLM_THREADS"] = str(cfg.threads)
    if cfg.drain_timeout is not None:
        env["SMOLLM_DRAIN_TIMEOUT"] = str(cfg.drain_timeout)
    cmd = [sys.executable, "-m", "service", "--checkpoint", str(run), "--host", "127.0.0.1"]
    port = free_port()
    server = ServerProcess("smollm service (reload bench)", [*cmd, "--port", str(port)], port, "/readyz", log_path, env)
    with server:
        raw = asyncio.run(_drive(server, cfg, run, staged, second))
    timeline = reload_timeline(log_path.read_text(errors="replace"), second)
    if "swapped" not in timeline:
        raise RuntimeError(f"no swap to {second} in the server log {log_path}")
    prof = swap_profile(timeline, raw["published"], raw["streams"])
    window_end = timeline["swapped"] + prof.get("recompute_done_s", 0.0)
    window = [r for r in raw["during"] if raw["published"] <= r.start <= window_end]
    everything = raw["baseline"] + raw["during"] + raw["streams"]
    errors = [r.error for r in everything if r.error is not None]
    base, phase, win = ttft_summary(raw["baseline"]), ttft_summary(raw["during"]), ttft_summary(window)

    def ratio(s: dict[str, Any]) -> float | None:
        if s["ttft_p50_ms"] is None or not base["ttft_p50_ms"]:
            return None
        return s["ttft_p50_ms"] / base["ttft_p50_ms"]

    swap_failures = _reload_failures(raw["metrics"])
    r = ratio(win)
    return {
        "dtype": served_dtype(raw["metrics"]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "baseline": base,
        "reload_phase": phase,
        "reload_window": win,
        "reload_window_s": window_end - raw["published"],
        "ratio_p50": r,
        "ratio_p50_phase": ratio(phase),
        "swap": prof,
        "swap_seen_s": raw["seen"] - raw["published"],
        "streams": {
            "requests": len(raw["streams"]),
            "failed": sum(x.error is not None for x in raw["streams"]),
            "completed": sum(x.finish_reason is not None for x in raw["streams"]),
        },
        # Per probe: (start, seconds from the publication; TTFT ms or None), to see where in the reload it hurt.
        "probe_timeline": [
            [round(p.start - raw["published"], 3), None if p.ttft is None else round(p.ttft * 1e3, 1)]
            for p in raw["baseline"] + raw["during"]
        ],
        "timeline_s": {
            k: round(v - raw["published"], 3) for k, v in timeline.items() if k in ("picked_up", "loaded", "swapped")
        },
        "reload_failures": swap_failures,
        "failed_requests": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "target_met": r is not None and r <= TARGET_RATIO and not errors and swap_failures == 0,
    }


def served_dtype(metrics: str) -> str:
    # The `dtype` label itself, not `kv_cache_dtype` (labels come sorted, so that one follows it).
    m = re.search(r'smollm_model_info\{(?:[^}]*,)?dtype="(\w+)"', metrics)
    return m.group(1) if m else "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = ReloadBenchConfig()
    p = argparse.ArgumentParser(prog="python -m bench.reload", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="model to serve (default: the embedded one)")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="server torch threads (default: all cores)")
    p.add_argument("--streams", type=int, default=d.streams)
    p.add_argument("--stream-tokens", type=int, default=d.stream_tokens)
    p.add_argument("--probe-tokens", type=int, default=d.probe_tokens)
    p.add_argument("--probe-interval", type=float, default=d.probe_interval, help="seconds between probes")
    p.add_argument("--phase-s", type=float, default=d.phase_s, help="seconds of probes per phase (at least)")
    p.add_argument("--drain-timeout", type=float, default=None, help="SMOLLM_DRAIN_TIMEOUT (default: the server's)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    cfg = ReloadBenchConfig(
        checkpoint=args.checkpoint,
        dtype=args.dtype,
        threads=args.threads,
        streams=args.streams,
        stream_tokens=args.stream_tokens,
        probe_tokens=args.probe_tokens,
        probe_interval=args.probe_interval,
        phase_s=args.phase_s,
        drain_timeout=args.drain_timeout,
    )
    now = datetime.now(UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    machine = describe_machine(measure=False)
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    with tempfile.TemporaryDirectory(prefix="smollm-reload-") as tmp:
        log_path = args.out / f"{stamp}-reload-logs" / "server.log"
        try:
            results = run_reload_bench(cfg, Path(tmp), log_path)
        except RuntimeError as e:
            sys.stderr.write(f"error: {e}\n")
            return 2
    results["machine"] = machine
    results["meta"] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_line(machine),
        "checkpoint": str(cfg.checkpoint or "embedded SmolLM2-135M-Instruct"),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "command": "python -m bench.reload " + " ".join(argv if argv is not None else sys.argv[1:]),
        "server_log": str(log_path),
    }
    path = report.write_json(results, args.out / f"{stamp}-reload.json")
    sys.stdout.write(format_report(results) + f"\n\nwrote {path}\n")
    return 0 if results["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
