"""The bridge between HTTP handlers and the engine: checks a request against the context, submits it and
turns engine events into an async stream (or one result), cancelling the sequence when the client leaves."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError

from model.sampling import SamplingParams
from service.engine import Engine, EngineDeadError, FinishReason, QueueFullError, Sequence, StreamEvent


def validation_error(field: str, message: str, value=None) -> RequestValidationError:
    """A 422 naming the field, shaped like FastAPI's own."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}]
    )


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    total_ms: float


class EngineFailure(RuntimeError):
    """The engine failed while running this request (not the client's fault)."""


class Generation:
    """One submitted request. Iterate `events()` to stream, or await `result()`; either cancels on exit."""

    def __init__(self, engine: Engine, seq: Sequence) -> None:
        self.engine = engine
        self.seq = seq
        self.id = uuid.uuid4().hex[:24]
        self._queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.finished = False
        seq.emit = lambda _seq, event: self._queue.put_nowait(event)  # runs on the event loop (see Engine)

    @property
    def prompt_tokens(self) -> int:
        return self.seq.num_prompt

    @property
    def completion_tokens(self) -> int:
        return len(self.seq.output_ids)

    async def events(self) -> AsyncIterator[StreamEvent]:
        """Text deltas, then one event with `finish_reason` set. Leaving early cancels the sequence."""
        try:
            while True:
                event = await self._queue.get()
                if event.finish_reason is not None:
                    self.finished = True
                yield event
                if self.finished:
                    return
        finally:
            if not self.finished:
                self.engine.cancel(self.seq)

    async def result(self, request: Request | None = None) -> GenerationResult | None:
        """Wait for the whole text; None when the client disconnected first (the sequence is then cancelled)."""
        parts: list[str] = []
        finish: StreamEvent | None = None

        async def consume() -> None:
            nonlocal finish
            async for event in self.events():
                if event.finish_reason is not None:
                    finish = event
                else:
                    parts.append(event.text)

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_disconnect(request)) if request is not None else None
        try:
            waiting = {consumer} if watcher is None else {consumer, watcher}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watcher is not None:
                watcher.cancel()
            if not consumer.done():
                consumer.cancel()  # its finally cancels the sequence
                self.engine.cancel(self.seq)
        if finish is None:
            return None
        if finish.finish_reason is FinishReason.ERROR:
            raise EngineFailure(finish.error or "engine error")
        return self.summary("".join(parts), finish.finish_reason)

    def summary(self, text: str, reason: FinishReason) -> GenerationResult:
        seq = self.seq
        end = seq.finished_time or time.monotonic()
        ttft = None if seq.first_token_time is None else (seq.first_token_time - seq.arrival_time) * 1000
        return GenerationResult(
            text=text,
            finish_reason=reason,
            prompt_tokens=seq.num_prompt,
            completion_tokens=len(seq.output_ids),
            ttft_ms=ttft,
            total_ms=(end - seq.arrival_time) * 1000,
        )


async def _wait_disconnect(request: Request) -> None:
    # The body has been read already, so the next message is the disconnect (servers block until then).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def start_generation(
    engine: Engine,
    prompt_ids: list[int],
    *,
    max_tokens: int | None,
    max_tokens_explicit: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop: list[str] | None,
    timeout: float,
    max_tokens_field: str = "max_tokens",
    ignore_eos: bool = False,
) -> Generation:
    """Validate against the model and the context, then queue. Raises HTTPException (400/429/503) or a 422."""
    context = engine.max_context
    n = len(prompt_ids)
    if n == 0:
        raise validation_error("prompt", "the prompt encodes to no tokens")
    if n >= context:
        raise HTTPException(400, f"prompt is {n} tokens; the context holds {context} (prompt + at least 1 new token)")
    room = context - n
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        if max_tokens_explicit:
            raise validation_error(
                max_tokens_field, f"max_tokens {max_tokens} exceeds the {room} tokens left after the {n}-token prompt "
                f"(context {context})", max_tokens,
            )
        max_tokens = room
    vocab = engine.vocab_size
    if top_k > vocab:
        raise validation_error("top_k", f"top_k must be <= the vocabulary size {vocab}", top_k)
    if any(t < 0 or t >= vocab for t in prompt_ids):
        raise validation_error("prompt", f"token ids must be in [0, {vocab})")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    seq = Sequence(
        prompt_ids=list(prompt_ids), max_tokens=max_tokens, params=params, stop=tuple(stop or ()), timeout=timeout,
        ignore_eos=ignore_eos,
    )
    gen = Generation(engine, seq)
    try:
        engine.submit(seq)
    except QueueFullError as e:
        raise HTTPException(429, f"server busy: {e}; retry later", headers={"Retry-After": "1"}) from e
    except EngineDeadError as e:
        raise HTTPException(503, f"{e}; retry later") from e
    return gen
