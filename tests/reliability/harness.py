"""What the reliability tests and the soak command share: a real `python -m service` subprocess, SSE clients
that count what they received, Prometheus text parsing and resident-memory readings.

Everything talks to 127.0.0.1 only, and every wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


TINY_YAML = REPO / "trainer" / "configs" / "tiny.yaml"
# Short, quiet trainer runs: no evaluation, samples, plot or peak-FLOPs measurement; a loss record per step.
QUICK_TRAINING = ["eval_every=0", "sample_every=0", "plot=false", "log_every=1", "peak_tflops=1"]


def trainer_cmd(out: Path, *overrides: str) -> list[str]:
    """`python -m trainer` on the tiny config writing into `out`."""
    return [sys.executable, "-m", "trainer", "--config", str(TINY_YAML), "--out", str(out), *QUICK_TRAINING, *overrides]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**smollm: object) -> dict[str, str]:
    """This process's environment without any SMOLLM_* setting but the cache directory, plus `smollm`
    (keys without the prefix: `MAX_QUEUE=4` becomes SMOLLM_MAX_QUEUE=4)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMOLLM_") or k == "SMOLLM_CACHE_DIR"}
    env.update({f"SMOLLM_{k.upper()}": str(v) for k, v in smollm.items() if v is not None})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class ServerProcess:
    """`python -m service` on 127.0.0.1:PORT in a subprocess; its stdout and stderr go to `log_path`.

    Used as a context manager: the process is stopped (SIGTERM, then SIGKILL) on exit, whatever happened.
    """

    def __init__(self, log_path: Path, checkpoint: Path | str | None = None, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.checkpoint = checkpoint
        self.env = clean_env(**settings)
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self, ready_timeout: float = 120.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.checkpoint is not None:
            cmd += ["--checkpoint", str(self.checkpoint)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop(timeout=5)
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{self.url} not ready after {timeout} s:\n{self.log()[-3000:]}")

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")
        return ""

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if still running after `timeout` seconds."""
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.proc.kill()
                self.wait(10)
        self.returncode = self.proc.returncode
        self._log.close()
        return self.returncode

    def __enter__(self) -> ServerProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (labels as written by prometheus_client)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def gauges_idle(m: dict[str, float]) -> bool:
    return (
        m.get("smollm_running_sequences") == 0
        and m.get("smollm_waiting_requests") == 0
        and m.get("smollm_kv_cache_slots_used") == 0
    )


def wait_idle(server: ServerProcess, timeout: float = 20.0) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds a slot; returns the last reading either way."""
    deadline = time.monotonic() + timeout
    m = server.metrics()
    while not gauges_idle(m) and time.monotonic() < deadline:
        time.sleep(0.1)
        m = server.metrics()
    return m


@dataclass
class StreamResult:
    """What one streaming client saw."""

    status: int = 0
    events: list[tuple[str, str]] = field(default_factory=list)  # (event name, data)
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""  # the body of a non-200 answer
    error: str | None = None  # a transport error (connection reset, timeout)
    elapsed: float = 0.0

    @property
    def token_events(self) -> list[dict]:
        return [json.loads(d) for e, d in self.events if e == "token"]

    @property
    def done(self) -> dict | None:
        found = [json.loads(d) for e, d in self.events if e == "done"]
        return found[-1] if found else None

    @property
    def openai_chunks(self) -> list[dict]:
        return [json.loads(d) for e, d in self.events if e == "message" and d != "[DONE]"]

    @property
    def openai_done(self) -> bool:
        return bool(self.events) and self.events[-1] == ("message", "[DONE]")


async def read_sse(response: httpx.Response, result: StreamResult, max_events: int | None = None) -> None:
    """Append (event, data) pairs to `result.events`; stop after `max_events` (None: until the end)."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line == "":
            if data:
                result.events.append((event, "\n".join(data)))
                if max_events is not None and len(result.events) >= max_events:
                    return
            event, data = "message", []


async def stream_request(
    client: httpx.AsyncClient, path: str, payload: dict, *, max_events: int | None = None, headers: dict | None = None
) -> StreamResult:
    """POST a streaming request and read its events (all, or the first `max_events`, then hang up)."""
    result = StreamResult()
    start = time.monotonic()
    try:
        async with client.stream("POST", path, json=payload, headers=headers) as r:
            result.status = r.status_code
            result.headers = dict(r.headers)
            if r.status_code != 200:
                result.body = (await r.aread()).decode(errors="replace")
            else:
                await read_sse(r, result, max_events)
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    result.elapsed = time.monotonic() - start
    return result


def token_count_problem(received: int, completion_tokens: int, finish_reason: str) -> str | None:
    """Every generated token must reach the client: one token event (chunk) per token. The one exception is
    the token that ended the sequence with finish_reason "stop" (the end-of-sequence token, or the last token
    of a stop string), which has no text to send."""
    allowed = {completion_tokens} if finish_reason != "stop" else {completion_tokens, completion_tokens - 1}
    if received not in allowed:
        return f"{received} token events but usage.completion_tokens={completion_tokens} (finish {finish_reason})"
    return None


def check_generate_stream(r: StreamResult, count_tokens: bool = True) -> str | None:
    """Why a finished /v1/generate stream is wrong, or None: status 200, a `done` event last, no `error`
    event, increasing token indices and (with `count_tokens`) one `token` event per generated token."""
    if r.error is not None:
        return f"transport error {r.error}"
    if r.status != 200:
        return f"status {r.status}: {r.body[:200]}"
    if not r.events or r.events[-1][0] != "done":
        return f"stream did not end with a done event: {r.events[-3:]}"
    if any(e == "error" for e, _ in r.events):
        return f"error event: {[d for e, d in r.events if e == 'error']}"
    indices = [t["index"] for t in r.token_events]
    if indices != sorted(set(indices)):
        return f"token indices not increasing: {indices[:50]}"
    done = r.done
    if not count_tokens:
        return None
    return token_count_problem(len(indices), done["usage"]["completion_tokens"], done["finish_reason"])


def check_openai_stream(r: StreamResult, count_tokens: bool = True) -> str | None:
    """Why a finished OpenAI stream (with include_usage) is wrong, or None: status 200, ends with [DONE],
    no error chunk, one finish_reason chunk and (with `count_tokens`) one content chunk per generated token."""
    if r.error is not None:
        return f"transport error {r.error}"
    if r.status != 200:
        return f"status {r.status}: {r.body[:200]}"
    if not r.openai_done:
        return f"stream did not end with [DONE]: {r.events[-3:]}"
    chunks = r.openai_chunks
    if any("error" in c for c in chunks):
        return f"error chunk: {[c for c in chunks if 'error' in c]}"
    usage = [c["usage"] for c in chunks if c.get("usage")]
    if not usage:
        return "no usage chunk"
    content = [c for c in chunks if c.get("choices") and c["choices"][0].get("finish_reason") is None]
    finishes = [
        c["choices"][0]["finish_reason"] for c in chunks if c.get("choices") and c["choices"][0].get("finish_reason")
    ]
    if len(finishes) != 1:
        return f"expected one finish_reason chunk, got {finishes}"
    if not count_tokens:
        return None
    return token_count_problem(len(content), usage[-1]["completion_tokens"], finishes[0])


PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three colours:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The quick brown fox",
    "What is 2 + 2?",
]


def random_prompt(rng: random.Random) -> str:
    return rng.choice(PROMPTS) + " " + " ".join(rng.choice(["please", "now", "again", "today"]) for _ in range(3))


def openai_usage(r: StreamResult) -> dict:
    return [c["usage"] for c in r.openai_chunks if c.get("usage")][-1]


async def one_stream(
    client: httpx.AsyncClient, i: int, prompt: str, max_tokens: int, temperature: float = 0.0
) -> tuple[str | None, int]:
    """Client i's streaming request (/v1/generate, /v1/completions or /v1/chat/completions by i % 3), checked
    to its end: (what was wrong or None, completion tokens)."""
    kind = i % 3
    if kind == 0:
        payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "seed": i, "stream": True}
        r = await stream_request(client, "/v1/generate", payload)
        problem = check_generate_stream(r)
        return problem, 0 if problem else r.done["usage"]["completion_tokens"]
    common = {
        "model": "smollm",
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if kind == 1:
        path, payload = "/v1/completions", {"prompt": prompt, **common}
    else:
        path, payload = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **common}
    r = await stream_request(client, path, payload)
    problem = check_openai_stream(r)
    return problem, 0 if problem else openai_usage(r)["completion_tokens"]


async def load_round(
    url: str,
    clients: int,
    max_tokens: int,
    rng: random.Random,
    *,
    headers: dict | None = None,
    timeout: float = 300.0,
    temperature: float = 0.0,
) -> dict:
    """`clients` concurrent streaming requests, the three generation endpoints in turn, each checked to its
    end. Returns figures: requests, errors (with the first few reasons), tokens, seconds."""
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    prompts = [random_prompt(rng) for _ in range(clients)]
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=headers) as client:
        start = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(*(one_stream(client, i, prompts[i], max_tokens, temperature) for i in range(clients))),
            timeout + 30,
        )
        elapsed = time.monotonic() - start
    problems = [p for p, _ in results if p is not None]
    tokens = sum(n for _, n in results)
    return {
        "requests": clients,
        "errors": len(problems),
        "error_samples": problems[:5],
        "tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
    }
