"""A fake streaming inference server with known timing, speaking both wire formats the load generator reads.

The prompt chooses the behaviour: "normal" streams `max_tokens` tokens (first after TTFT, then one every ITL);
"status-429" answers 429; "error-event" streams two tokens then an error; "cut" ends the stream early;
"short" stops after 3 tokens with finish_reason "stop".
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from model.bundled import default_checkpoint
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.llama import Transformer
from model.tokenizer import load_tokenizer

TTFT_S = 0.05
ITL_S = 0.01
PROMPTS_SEEN: list[str] = []  # every request's prompt, in arrival order


def _sse(event: str | None, data: str) -> str:
    # CRLF line ends, as sse-starlette writes them, and a keep-alive comment now and then.
    head = f"event: {event}\r\n" if event else ""
    return f": ping\r\n{head}data: {data}\r\n\r\n"


# Streams being generated now and the most at once since the last reset: a test proves the load generator's
# concurrency by what the server saw, not by wall time (which a loaded CI machine stretches).
IN_FLIGHT = {"now": 0, "peak": 0}


async def _tokens(prompt: str, max_tokens: int) -> AsyncIterator[tuple[int, str | None]]:
    """(index, finish_reason once at the end) with the fake's timing; finish "error" or "cut" for failures."""
    n = {"short": 3, "error-event": 2, "cut": 2}.get(prompt, max_tokens)
    IN_FLIGHT["now"] += 1
    IN_FLIGHT["peak"] = max(IN_FLIGHT["peak"], IN_FLIGHT["now"])
    try:
        await asyncio.sleep(TTFT_S)
        for i in range(n):
            if i:
                await asyncio.sleep(ITL_S)
            yield i, None
        yield n, {"short": "stop", "error-event": "error", "cut": "cut"}.get(prompt, "length")
    finally:
        IN_FLIGHT["now"] -= 1


async def generate(request: Request) -> Response:
    body = await request.json()
    PROMPTS_SEEN.append(body["prompt"])
    if body["prompt"] == "status-429":
        return JSONResponse({"detail": "queue full"}, status_code=429, headers={"Retry-After": "1"})

    async def events() -> AsyncIterator[str]:
        async for i, finish in _tokens(body["prompt"], body["max_tokens"]):
            if finish == "error":
                yield _sse("error", json.dumps({"message": "boom"}))
            elif finish == "cut":
                return
            elif finish:
                yield _sse(
                    "done", json.dumps({"finish_reason": finish, "usage": {"prompt_tokens": 5, "completion_tokens": i}})
                )
            else:
                yield _sse("token", json.dumps({"text": f" t{i}", "index": i}))

    return StreamingResponse(events(), media_type="text/event-stream")


async def completions(request: Request) -> Response:
    body = await request.json()
    PROMPTS_SEEN.append(body["prompt"])
    if body["prompt"] == "status-429":
        return JSONResponse({"error": "busy"}, status_code=429)

    async def chunks() -> AsyncIterator[str]:
        async for i, finish in _tokens(body["prompt"], body["max_tokens"]):
            if finish == "error":
                yield _sse(None, json.dumps({"error": {"message": "boom"}}))
                return
            if finish == "cut":
                return
            if finish:
                yield _sse(None, json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": finish}]}))
                yield _sse(None, json.dumps({"choices": [], "usage": {"completion_tokens": i}}))
                yield _sse(None, "[DONE]")
            else:
                yield _sse(None, json.dumps({"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}))

    return StreamingResponse(chunks(), media_type="text/event-stream")


@dataclass(frozen=True)
class FakeServer:
    url: str
    ttft_s: float = TTFT_S
    itl_s: float = ITL_S

    def reset_peak(self) -> None:
        IN_FLIGHT["peak"] = IN_FLIGHT["now"]

    @property
    def peak_in_flight(self) -> int:
        """The most streams generated at once since `reset_peak`."""
        return IN_FLIGHT["peak"]

    @property
    def prompts_seen(self) -> list[str]:
        return PROMPTS_SEEN


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeServer]:
    """The fake server, running in a background thread for the whole session."""
    app = Starlette(
        routes=[
            Route("/v1/generate", generate, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake server did not start")
        time.sleep(0.02)
    yield FakeServer(f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    model = Transformer(ModelConfig.from_name("tiny"))
    model.init_weights(0)
    tokenizer = load_tokenizer(default_checkpoint())
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "ck", model, tokenizer=tokenizer)
