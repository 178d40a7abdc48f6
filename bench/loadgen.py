"""A bounded closed-loop load generator: N concurrent streaming clients against a local inference server.

Each client sends one greedy streaming request at a time (fixed prompts, taken in turn) until the total
number of requests is reached or the time limit passes. Two wire formats are spoken:

- ``smollm``: our ``POST /v1/generate`` with ``stream: true`` (SSE ``token`` events, then ``done`` with usage);
- ``openai``: ``POST /v1/completions`` with ``stream: true`` (``data: {chunk}`` lines ending ``data: [DONE]``),
  as served by llama.cpp's ``llama-server`` (and by our OpenAI-compatible route).

What is measured per request: time to the first token, the arrival time of every token, and the completion
tokens actually received (the server's ``usage`` when it sends one, else the token events counted). The
summary is the aggregate generated tokens per second over the wall time of the whole load, TTFT and
inter-token latency percentiles, and the errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)

Api = Literal["smollm", "openai"]
LOCAL_HOSTS = ("127.0.0.1", "localhost")

# Open-ended prompts that make SmolLM2-135M-Instruct write on past 128 tokens, so a greedy run of ours (which
# has no ignore_eos) produces about as many tokens as an anchor told to ignore the end-of-sequence token.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The history of the Roman Empire is a long story. It begins",
    "Here is a detailed guide to growing tomatoes in your garden. First,",
    "Chapter 1. The old lighthouse keeper had lived alone on the island for",
    "Photosynthesis is the process by which plants turn sunlight into energy. In this article we explain",
    "The following is a list of the most important inventions of the nineteenth century:",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "Machine learning is a field of computer science that studies how computers can learn. The main ideas are",
    "A travel diary: Day 1. We arrived in Lisbon early in the morning and",
)


@dataclass(frozen=True)
class LoadConfig:
    """One load level. ``requests`` defaults to ``max(concurrency, min_requests)``."""

    base_url: str
    api: Api = "smollm"
    concurrency: int = 1
    requests: int | None = None
    min_requests: int = 4
    max_tokens: int = 128
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    model: str | None = None  # the OpenAI `model` field; llama-server ignores it, ours checks it if given
    extra_body: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"ignore_eos": True} for llama-server
    request_timeout: float = 300.0
    time_limit: float = 300.0  # no request starts after this; requests still running then are cut off
    # Each request's prompt begins with its own label ("Request 16.3: "), so no two share a beginning: no prefix
    # reuse between requests, on either server. Off: the fixed prompts repeat (16 clients send each one twice).
    distinct_prompts: bool = False

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme != "http" or parts.hostname not in LOCAL_HOSTS:
            raise ValueError(f"base_url must be http://127.0.0.1:PORT (local only), got {self.base_url!r}")
        if self.api not in ("smollm", "openai"):
            raise ValueError(f"api must be 'smollm' or 'openai', got {self.api!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.prompts:
            raise ValueError("prompts must not be empty")
        if self.time_limit <= 0 or self.request_timeout <= 0:
            raise ValueError("time_limit and request_timeout must be positive")

    @property
    def total_requests(self) -> int:
        return self.requests if self.requests is not None else max(self.concurrency, self.min_requests)

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + ("/v1/generate" if self.api == "smollm" else "/v1/completions")

    def prompt(self, index: int) -> str:
        """The prompt of this level's request number `index` (from 0)."""
        text = self.prompts[index % len(self.prompts)]
        return f"Request {self.concurrency}.{index + 1}: {text}" if self.distinct_prompts else text

    def body(self, prompt: str) -> dict[str, Any]:
        if self.api == "smollm":
            body: dict[str, Any] = {"prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0.0, "stream": True}
        else:
            body = {
                "prompt": prompt,
                "max_tokens": self.max_tokens,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if self.model is not None:
                body["model"] = self.model
        body.update(self.extra_body)
        return body


@dataclass
class RequestResult:
    """One request as the client saw it; times are seconds on the client's monotonic clock."""

    start: float
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival of each token event
    usage_tokens: int | None = None  # completion tokens the server reported, if it did
    finish_reason: str | None = None
    error: str | None = None
    cut_off: bool = False  # still running when the time limit passed (not a server error)

    @property
    def completion_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def inter_token_latencies(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


@dataclass
class LoadSummary:
    """What one load level measured. Latencies in milliseconds; None where nothing was observed."""

    concurrency: int
    requests: int
    completed: int
    errors: int
    cut_off: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    mean_tokens_per_request: float
    finish_reasons: dict[str, int]
    error_samples: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not values:
        return None
    s = sorted(values)
    rank = (len(s) - 1) * q / 100
    lo = int(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def summarize(results: Sequence[RequestResult], wall_s: float, concurrency: int) -> LoadSummary:
    """Aggregate per-request results: tokens/s counts every token received (cut-off requests included)
    over the load's wall time; TTFT and ITL percentiles pool all requests that produced tokens."""
    ttfts = [r.ttft for r in results if r.ttft is not None]
    itls = [x for r in results for x in r.inter_token_latencies]
    tokens = sum(r.completion_tokens for r in results)
    completed = [r for r in results if r.error is None and not r.cut_off]
    errors = [r for r in results if r.error is not None]
    return LoadSummary(
        concurrency=concurrency,
        requests=len(results),
        completed=len(completed),
        errors=len(errors),
        cut_off=sum(r.cut_off for r in results),
        completion_tokens=tokens,
        wall_s=wall_s,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50_ms=_ms(percentile(ttfts, 50)),
        ttft_p95_ms=_ms(percentile(ttfts, 95)),
        itl_p50_ms=_ms(percentile(itls, 50)),
        itl_p95_ms=_ms(percentile(itls, 95)),
        mean_tokens_per_request=sum(r.completion_tokens for r in completed) / len(completed) if completed else 0.0,
        finish_reasons=dict(Counter(r.finish_reason or "none" for r in completed)),
        error_samples=sorted({r.error for r in errors if r.error})[:5],
    )


async def iter_sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) for each server-sent event; comments (keep-alive pings) are skipped."""
    event, data = "message", []
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if data:
        yield event, "\n".join(data)


async def _read_smollm(resp: httpx.Response, result: RequestResult) -> None:
    async for event, data in iter_sse(resp.aiter_lines()):
        if event == "token":
            result.token_times.append(time.perf_counter())
        elif event == "done":
            payload = json.loads(data)
            result.finish_reason = payload.get("finish_reason")
            usage = payload.get("usage") or {}
            if "completion_tokens" in usage:
                result.usage_tokens = int(usage["completion_tokens"])
            return
        elif event == "error":
            result.error = f"error event: {data[:200]}"
            return
    result.error = "stream ended without a done event"


async def _read_openai(resp: httpx.Response, result: RequestResult) -> None:
    async for _, data in iter_sse(resp.aiter_lines()):
        if data.strip() == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = f"error chunk: {data[:200]}"
            return
        for choice in chunk.get("choices") or []:
            # One chunk per generated token; a final chunk may carry only the finish reason.
            if choice.get("text"):
                result.token_times.append(time.perf_counter())
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
        usage = chunk.get("usage")
        if usage and "completion_tokens" in usage:
            result.usage_tokens = int(usage["completion_tokens"])
    result.error = "stream ended without data: [DONE]"


async def _one_request(client: httpx.AsyncClient, cfg: LoadConfig, prompt: str, deadline: float) -> RequestResult:
    result = RequestResult(start=time.perf_counter())
    budget = min(cfg.request_timeout, deadline - result.start)
    try:
        async with asyncio.timeout(budget):
            async with client.stream("POST", cfg.endpoint, json=cfg.body(prompt)) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")[:200]
                    result.error = f"HTTP {resp.status_code}: {body}"
                elif cfg.api == "smollm":
                    await _read_smollm(resp, result)
                else:
                    await _read_openai(resp, result)
    except TimeoutError:
        if budget < cfg.request_timeout:
            result.cut_off = True
        else:
            result.error = f"timed out after {cfg.request_timeout:g} s"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"[:200]
    result.end = time.perf_counter()
    return result


async def run_load(cfg: LoadConfig) -> LoadSummary:
    """Run one load level and summarise it. Never raises for server-side failures: they are counted."""
    total = cfg.total_requests
    results: list[RequestResult] = []
    next_index = 0
    start = time.perf_counter()
    deadline = start + cfg.time_limit

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < total and time.perf_counter() < deadline:
            prompt = cfg.prompt(next_index)
            next_index += 1
            results.append(await _one_request(client, cfg, prompt, deadline))

    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    timeout = httpx.Timeout(cfg.request_timeout, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(cfg.concurrency)))
    wall = time.perf_counter() - start
    summary = summarize(results, wall, cfg.concurrency)
    log.info(
        "%s c=%d: %d requests, %.1f tok/s, ttft p50 %.0f ms, %d errors",
        cfg.api,
        cfg.concurrency,
        summary.requests,
        summary.tokens_per_s,
        summary.ttft_p50_ms or 0.0,
        summary.errors,
    )
    return summary


def run_load_sync(cfg: LoadConfig) -> LoadSummary:
    return asyncio.run(run_load(cfg))
