"""Chaos run: concurrent streaming load on a real server while faults are injected in random order, then the
figures that say whether anything hung, leaked or served garbage.

    python -m tests.reliability.chaos --minutes 2
    python -m tests.reliability.chaos --minutes 0.5 --clients 6 --json chaos.json

The server is the real app (`service.app.create_app`) under uvicorn on a free 127.0.0.1 port, in this process,
so faults that no HTTP client can cause (a model swap that raises, an engine step that raises) are injected by
patching the live engine. It serves a tiny random model from a trainer-style output directory that it hot-reloads.
Injected, in random order, again and again until the time is up:

- a checkpoint with NaN weights and one truncated mid-file (both must be refused; the old model keeps serving),
- a model swap that raises (the old model keeps serving; the checkpoint is retried and then served),
- an engine step that raises (the running requests end with an error event; the engine keeps going),
- a client that stops reading its stream, a 1 MiB prompt, and a body sent too slowly (slowloris).

Reported: requests sent, completed, errored (an error event or an error status), hung (no end within its
deadline + 5 s), tokens sampled from non-finite logits, /healthz latency p50/p99 during the run, and KV-cache
slots still held once the load is over. It exits non-zero when anything hung, a NaN token was served, a slot
leaked, or no request completed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402

from model.bundled import default_checkpoint  # noqa: E402
from model.checkpoint import save_checkpoint  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.llama import Transformer  # noqa: E402
from model.run_dir import step_dir_name, write_latest  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402
from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.reliability.harness import StreamResult, free_port, random_prompt, read_sse  # noqa: E402

log = logging.getLogger("chaos")

FAULTS = (
    "nan_checkpoint",
    "truncated_checkpoint",
    "swap_raises",
    "step_raises",
    "client_stops_reading",
    "huge_prompt",
    "slow_body",
)
TINY = ModelConfig.from_name("tiny").replace(block_size=1024)
REQUEST_TIMEOUT = 30.0  # the server's request timeout; a client's deadline is this + 5 s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.reliability.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=2.0, help="how long the load and the faults go on (default 2)")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default 8)")
    p.add_argument("--fault-every", type=float, default=2.0, help="seconds between injected faults (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.fault_every <= 0:
        p.error("--minutes, --clients and --fault-every must be positive")
    return args


# ---------------------------------------------------------------- checkpoints


class RunDir:
    """A trainer-style output directory the server watches; each write is a new `step-*` plus `latest`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokenizer = load_tokenizer(default_checkpoint())
        self.step = 0

    def _next(self) -> Path:
        self.step += 1
        return self.root / step_dir_name(self.step)

    @staticmethod
    def _model(seed: int) -> Transformer:
        model = Transformer(TINY)
        model.init_weights(seed=seed)
        return model

    def write_good(self, seed: int) -> Path:
        model = self._model(seed)
        path = save_checkpoint(self._next(), model, tokenizer=self.tokenizer)
        write_latest(self.root, path.name)
        return path

    def write_nan(self) -> Path:
        model = self._model(self.step)
        with torch.no_grad():
            model.layers[0].feed_forward.w2.weight.fill_(float("nan"))
        path = save_checkpoint(self._next(), model, tokenizer=self.tokenizer)
        write_latest(self.root, path.name)
        return path

    def write_truncated(self) -> Path:
        """A checkpoint whose weights file ends mid-file, published whole (as a copy cut short on its way would be).
        Truncating a published one in place instead raced the server's load of it: a file shrinking under a
        reader's memory map kills the reader with SIGBUS (seen once in CI)."""
        final = self._next()
        staging = self.root / f".staging-{final.name}"
        save_checkpoint(staging, self._model(self.step), tokenizer=self.tokenizer)
        weights = staging / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        staging.rename(final)
        write_latest(self.root, final.name)
        return final


# ---------------------------------------------------------------- the server


class InProcessServer:
    """The app under uvicorn in a thread, so the test can reach the live engine."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="chaos-uvicorn", daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"{self.url} not ready after 120 s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def engine(self):
        return self.app.state.engine


class NanWatch:
    """Counts tokens sampled from non-finite logits, by wrapping the model's forward (a host sync per step: fine
    for a test, never in the server)."""

    def __init__(self) -> None:
        self.nan_rows = 0
        self._original = Transformer.forward

    def __enter__(self) -> NanWatch:
        original = self._original
        watch = self

        def forward(model, *args, **kwargs):
            logits = original(model, *args, **kwargs)
            flat = logits.reshape(-1, logits.shape[-1])
            watch.nan_rows += int((~torch.isfinite(flat)).any(dim=-1).sum())
            return logits

        Transformer.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        Transformer.forward = self._original


def fail_once(obj: object, name: str, message: str) -> None:
    """Make `obj.name(...)` raise once, then behave as before."""
    original = getattr(obj, name)

    def failing(*args, **kwargs):
        setattr(obj, name, original)
        raise RuntimeError(message)

    setattr(obj, name, failing)


# ---------------------------------------------------------------- clients


class Tally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.samples: dict[str, list[str]] = {}
        self.tokens = 0

    def add(self, outcome: str, detail: str = "") -> None:
        self.counts[outcome] += 1
        if detail and len(self.samples.setdefault(outcome, [])) < 5:
            self.samples[outcome].append(detail[:300])


async def one_request(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    payload = {
        "prompt": random_prompt(rng),
        "max_tokens": rng.randint(8, 48),
        "temperature": 0.8,
        "seed": rng.randrange(1 << 30),
        "stream": True,
    }
    tally.add("sent")
    result = StreamResult()
    events = result.events
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT + 5):
            async with client.stream("POST", "/v1/generate", json=payload) as r:
                if r.status_code != 200:
                    await r.aread()
                    tally.add("errored", f"status {r.status_code}")
                    return
                await read_sse(r, result)
    except TimeoutError:
        tally.add("hung", f"no end after {REQUEST_TIMEOUT + 5} s: {events[-2:]}")
        return
    except httpx.HTTPError as e:
        tally.add("errored", f"transport: {type(e).__name__}: {e}")
        return
    names = [e for e, _ in events]
    if "error" in names:
        tally.add("errored", "error event")
    elif names and names[-1] == "done":
        done = json.loads(events[-1][1])
        tally.tokens += done["usage"]["completion_tokens"]
        tally.add("completed")
    else:
        tally.add("errored", f"stream ended without done: {events[-2:]}")


async def client_loop(url: str, seed: int, stop_at: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT + 10) as client:
        while time.monotonic() < stop_at:
            await one_request(client, rng, tally)


async def health_loop(url: str, stop_at: float, latencies: list[float], failures: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while time.monotonic() < stop_at:
            start = time.monotonic()
            try:
                r = await client.get("/healthz")
                if r.status_code != 200:
                    failures.append(f"status {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                failures.append(f"{type(e).__name__}: {e}")
            latencies.append(time.monotonic() - start)
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------- faults


def raw_request(port: int, head: bytes, body: bytes, *, read: bool, wait: float) -> bytes:
    """Send a request by hand; read the answer (or not) within `wait` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(head + body)
        if not read:
            time.sleep(wait)
            return b""
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def post_head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def inject(fault: str, server: InProcessServer, run_dir: RunDir, rng: random.Random, notes: Counter) -> None:
    engine = server.engine
    if fault == "nan_checkpoint":
        run_dir.write_nan()
    elif fault == "truncated_checkpoint":
        run_dir.write_truncated()
    elif fault == "swap_raises":
        fail_once(engine.runner, "set_model", "injected: swap failed")
        run_dir.write_good(seed=rng.randrange(1 << 20))
    elif fault == "step_raises":
        fail_once(engine.runner, "run", "injected: engine step failed")
    elif fault == "client_stops_reading":
        body = json.dumps(
            {"prompt": "Tell me a story", "max_tokens": 400, "ignore_eos": True, "stream": True, "temperature": 0}
        ).encode()
        await asyncio.to_thread(
            raw_request, server.port, post_head("/v1/generate", len(body)), body, read=False, wait=3.0
        )
    elif fault == "huge_prompt":
        body = json.dumps({"prompt": "a " * 500_000, "max_tokens": 4}).encode()
        answer = await asyncio.to_thread(
            raw_request, server.port, post_head("/v1/generate", len(body)), body, read=True, wait=15.0
        )
        status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"
        notes[f"huge_prompt_status_{status}"] += 1
    elif fault == "slow_body":
        answer = await asyncio.to_thread(
            raw_request, server.port, post_head("/v1/generate", 1000), b'{"prompt":', read=True, wait=30.0
        )
        status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"
        notes[f"slow_body_status_{status}"] += 1
    notes[fault] += 1


async def fault_loop(
    server: InProcessServer, run_dir: RunDir, stop_at: float, every: float, seed: int, notes: Counter
) -> None:
    rng = random.Random(seed)
    order: list[str] = []
    running: list[asyncio.Task] = []

    async def guarded(fault: str) -> None:
        try:
            await inject(fault, server, run_dir, rng, notes)
        except Exception as e:  # a fault that could not be injected is a finding, not a crash of the run
            notes[f"inject_failed:{fault}:{type(e).__name__}: {e}"] += 1

    while time.monotonic() < stop_at:
        await asyncio.sleep(every)
        if not order:
            order = list(FAULTS)
            rng.shuffle(order)
        # Faults overlap: a slow body or a stalled reader must not hold back the next injection.
        running.append(asyncio.create_task(guarded(order.pop())))
    await asyncio.gather(*running)


# ---------------------------------------------------------------- the run


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_load(server: InProcessServer, run_dir: RunDir, args: argparse.Namespace) -> dict:
    stop_at = time.monotonic() + args.minutes * 60
    tally, notes = Tally(), Counter()
    latencies: list[float] = []
    health_failures: list[str] = []
    await asyncio.gather(
        *(client_loop(server.url, args.seed * 1000 + i, stop_at, tally) for i in range(args.clients)),
        health_loop(server.url, stop_at, latencies, health_failures),
        fault_loop(server, run_dir, stop_at, args.fault_every, args.seed, notes),
    )
    return {"tally": tally, "notes": notes, "latencies": latencies, "health_failures": health_failures}


def wait_idle(engine, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not engine.idle():
        time.sleep(0.1)


def chaos(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="smollm-chaos-") as tmp:
        run_dir = RunDir(Path(tmp) / "run")
        run_dir.root.mkdir()
        run_dir.write_good(seed=0)
        settings = Settings(
            checkpoint=str(run_dir.root),
            dtype="float32",
            device="cpu",
            max_batch_size=8,
            max_context=TINY.block_size,
            max_queue=64,
            reload_interval=0.3,
            reload_retry_after=1.0,
            body_read_timeout=5.0,
            sse_send_timeout=5.0,
            threads=1,
            request_timeout=REQUEST_TIMEOUT,
            pack_weights=False,
        )
        with NanWatch() as nan_watch, InProcessServer(settings) as server:
            start = time.monotonic()
            found = asyncio.run(run_load(server, run_dir, args))
            elapsed = time.monotonic() - start
            wait_idle(server.engine, 30)
            usage = server.engine.cache_manager.usage()
            serving = server.engine.info.checkpoint
    tally: Tally = found["tally"]
    c = tally.counts
    return {
        "seconds": round(elapsed, 1),
        "clients": args.clients,
        "requests_sent": c["sent"],
        "completed": c["completed"],
        "errored": c["errored"],
        "hung": c["hung"],
        "tokens": tally.tokens,
        "nan_tokens_served": nan_watch.nan_rows,
        "healthz_p50_ms": round(percentile(found["latencies"], 0.50) * 1000, 1),
        "healthz_p99_ms": round(percentile(found["latencies"], 0.99) * 1000, 1),
        "healthz_failures": len(found["health_failures"]),
        "leaked_slots": usage.slots_used,
        "faults_injected": dict(found["notes"]),
        "serving_at_end": serving,
        "samples": tally.samples,
    }


def problems(figures: dict) -> list[str]:
    found = []
    if figures["hung"]:
        found.append(f"{figures['hung']} requests hung")
    if figures["nan_tokens_served"]:
        found.append(f"{figures['nan_tokens_served']} tokens sampled from non-finite logits")
    if figures["leaked_slots"]:
        found.append(f"{figures['leaked_slots']} KV-cache slots still held after the load")
    if not figures["completed"]:
        found.append("no request completed")
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    figures = chaos(args)
    print(json.dumps({k: v for k, v in figures.items() if k != "samples"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    found = problems(figures)
    for p in found:
        print(f"FAIL: {p}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
