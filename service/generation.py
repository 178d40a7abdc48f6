"""The bridge between HTTP handlers and the engine: builds and bounds the prompt (tokenized off the event loop),
checks it against the context, submits it and turns engine events into an async stream (or one result),
cancelling the sequence when the client leaves or stops reading."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError

from model.sampling import SamplingParams, TokenLogprobs
from service.engine import Engine, EngineDeadError, FinishReason, QueueFullError, Sequence, StreamEvent
from service.errors import ApiError
from service.structured_output import StructuredOutput

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never seen by anyone
# No token of SmolLM2's vocabulary decodes to more than 81 characters, so a text longer than context x 128
# characters cannot fit the context: it is refused before tokenizing it costs anything (1 MiB takes ~1 s).
MAX_CHARS_PER_TOKEN = 128


def check_prompt_chars(engine: Engine, chars: int, field: str) -> None:
    """400 naming `field` when `chars` characters certainly encode to more tokens than the context holds."""
    limit = engine.max_context * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise ApiError(
            400,
            f"{field}: {chars} characters cannot fit the context of {engine.max_context} tokens (at most "
            f"{limit} characters are accepted)",
            param=field,
        )


async def encode_prompt_async(engine: Engine, prompt: str, chat: bool, field: str = "prompt") -> list[int]:
    """`encode_prompt` after the character bound, in a worker thread: the event loop (SSE streams, probes) keeps
    running while a long prompt is tokenized (the tokenizer releases the GIL)."""
    check_prompt_chars(engine, len(prompt), field)
    return await asyncio.to_thread(encode_prompt, engine, prompt, chat)


async def chat_ids_async(engine: Engine, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """`chat_ids` after the character bound on the messages' text, in a worker thread."""
    check_prompt_chars(engine, sum(len(m["content"]) for m in messages), "messages")
    return await asyncio.to_thread(chat_ids, engine.tokenizer, messages, add_generation_prompt)


def encode_prompt(engine: Engine, prompt: str, chat: bool) -> list[int]:
    """Token ids for `prompt`: as it is, or wrapped as one user message in the checkpoint's chat template."""
    tokenizer = engine.tokenizer
    if not chat:
        return tokenizer.encode(prompt, add_special_tokens=False)
    return chat_ids(tokenizer, [{"role": "user", "content": prompt}])


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """`messages` through the chat template, ending with the assistant's turn (unless `add_generation_prompt` is
    False); 400 when there is no template or the template refuses them."""
    if not getattr(tokenizer, "chat_template", None):
        raise HTTPException(400, "this checkpoint's tokenizer has no chat template; use a plain prompt")
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
    except Exception as e:  # a template may reject a message order (e.g. two system messages)
        raise ApiError(400, f"messages: the chat template rejected them: {e}", param="messages") from e
    return list(ids)


def validation_error(field: str, message: str, value=None) -> RequestValidationError:
    """A 422 naming the field, shaped like FastAPI's own."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}])


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    total_ms: float
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per generated token, when asked


class GenerationError(RuntimeError):
    """The request ended without an answer: the engine failed (503) or it timed out before its first token (504)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def finish_error(gen: Generation, event: StreamEvent) -> GenerationError | None:
    """What the final `event` means for the client when it is not an answer: an engine failure, or a timeout
    that came before any token (a request that waited in the queue until its deadline)."""
    if event.finish_reason is FinishReason.ERROR:
        return GenerationError(503, f"generation failed: {event.error or 'engine error'}")
    if event.finish_reason is FinishReason.TIMEOUT and gen.completion_tokens == 0:
        timeout = gen.seq.timeout
        return GenerationError(
            504, f"request timed out after {timeout:g} s before its first token (the server is busy); retry later"
        )
    return None


class EventStream(EventSourceResponse):
    """Server-sent events with a send timeout: a client that stops reading is dropped after `send_timeout`
    seconds (its generator is closed, which cancels its sequence) instead of holding a slot and a socket."""

    def __init__(self, content, send_timeout: float) -> None:
        super().__init__(content, ping=15, send_timeout=send_timeout)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except* SendTimeoutError:
            log.info("dropped a client that read nothing for %g s", self.send_timeout)


class Generation:
    """One submitted request. Iterate `events()` to stream, or await `result()`; either cancels on exit."""

    def __init__(self, engine: Engine, seq: Sequence) -> None:
        self.engine = engine
        self.seq = seq
        self.id = uuid.uuid4().hex[:24]
        self._queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.finished = False
        self.counts_prompt = True  # False for the 2nd..nth choices of one prompt: usage counts a prompt once
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
        results = await gather_results([self], request)
        return None if results is None else results[0]

    async def _collect(self) -> tuple[list[StreamEvent], StreamEvent | None]:
        """Every token event, and the final one (None if the iteration was cut)."""
        tokens: list[StreamEvent] = []
        async for event in self.events():
            if event.finish_reason is not None:
                return tokens, event
            tokens.append(event)
        return tokens, None

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


_Collected = asyncio.Task[tuple[list[StreamEvent], StreamEvent | None]]


async def gather_results(gens: list[Generation], request: Request | None = None) -> list[GenerationResult] | None:
    """Wait for every generation's whole text, in order; None when the client disconnected first (all are then
    cancelled). Raises the first GenerationError among them (the others are cancelled)."""
    consumers = [asyncio.ensure_future(g._collect()) for g in gens]
    watcher = asyncio.ensure_future(_wait_disconnect(request)) if request is not None else None
    try:
        pending = set(consumers)
        while pending:
            waiting = pending if watcher is None else pending | {watcher}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if watcher is not None and watcher in done:
                return None
            pending -= done
            for task in done:
                collected = cast(_Collected, task)  # the watcher was handled above
                _, finish = collected.result()
                error = None if finish is None else finish_error(gens[consumers.index(collected)], finish)
                if error is not None:
                    raise error
    finally:
        if watcher is not None:
            watcher.cancel()
        for gen, task in zip(gens, consumers, strict=True):
            if not task.done():
                task.cancel()  # its finally cancels the sequence
                gen.engine.cancel(gen.seq)
    out = []
    for gen, task in zip(gens, consumers, strict=True):
        tokens, finish = task.result()
        if finish is None:
            return None
        assert finish.finish_reason is not None  # the final event always carries one
        result = gen.summary("".join(e.text for e in tokens), finish.finish_reason)
        result.logprobs = [e.logprobs for e in tokens if e.logprobs is not None]
        out.append(result)
    return out


async def merged_events(gens: list[Generation]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """(index in `gens`, event) as they come from all of them, until every one has finished. Leaving early
    cancels the ones still running."""
    queue: asyncio.Queue[tuple[int, StreamEvent | None]] = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for event in gen.events():
                queue.put_nowait((i, event))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        running = len(tasks)
        while running:
            i, event = await queue.get()
            if event is None:
                running -= 1
                continue
            yield i, event
    finally:
        for task in tasks:
            task.cancel()


async def _wait_disconnect(request: Request) -> None:
    # The body has been read already, so the next message is the disconnect (servers block until then).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sampling_params(body, vocab: int, *, logprobs: int | None = None, seed: int | None = None) -> SamplingParams:
    """The `SamplingParams` a request body asks for (its temperature, top_k, top_p and `SamplingFields`), with
    token ids checked against the vocabulary; a 422 (400 on the OpenAI routes) naming the field otherwise.
    `seed` overrides the body's (the n choices of one request each get their own)."""
    if body.top_k > vocab:
        raise validation_error("top_k", f"top_k must be <= the vocabulary size {vocab}", body.top_k)
    bias = None
    if body.logit_bias:
        bias = {int(k): v for k, v in body.logit_bias.items()}
        bad = [t for t in bias if t >= vocab]
        if bad:
            raise validation_error(
                "logit_bias", f"token id {bad[0]} is not in the vocabulary [0, {vocab})", body.logit_bias
            )
    stop_ids = tuple(body.stop_token_ids or ())
    bad = [t for t in stop_ids if t >= vocab]
    if bad:
        raise validation_error(
            "stop_token_ids", f"token id {bad[0]} is not in the vocabulary [0, {vocab})", body.stop_token_ids
        )
    return SamplingParams(
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        seed=body.seed if seed is None else seed,
        min_p=body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=bias,
        min_tokens=body.min_tokens,
        stop_token_ids=stop_ids,
        logprobs=logprobs,
    )


async def structured_output_async(engine: Engine, response_format: dict | None) -> StructuredOutput | None:
    """The grammar matcher `response_format` asks for (None for none), compiled in a worker thread (ms; the
    tokenizer's table, built once, takes seconds); 400 naming `response_format` when it is bad."""
    if response_format is None:
        return None
    try:
        return await asyncio.to_thread(
            StructuredOutput.from_response_format, response_format, engine.tokenizer, engine.vocab_size
        )
    except ValueError as e:
        message = str(e) if str(e).startswith("response_format") else f"response_format: {e}"
        raise ApiError(400, message, param="response_format") from e


def build_sequence(
    engine: Engine,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    max_tokens: int | None,
    max_tokens_explicit: bool,
    stop: str | list[str] | None,
    timeout: float,
    max_tokens_field: str = "max_tokens",
    prompt_field: str = "prompt",
    ignore_eos: bool = False,
    structured: StructuredOutput | None = None,
) -> Sequence:
    """A sequence checked against the model and the context (not yet queued). Raises ApiError (400) or a 422
    naming the field."""
    context = engine.max_context
    n = len(prompt_ids)
    if n == 0:
        raise validation_error(prompt_field, "the prompt encodes to no tokens")
    if n >= context:
        raise ApiError(
            400,
            f"{prompt_field}: the prompt is {n} tokens; the context holds {context} (prompt + at least 1 new token)",
            param=prompt_field,
            code="context_length_exceeded",
        )
    room = context - n
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        if max_tokens_explicit:
            raise validation_error(
                max_tokens_field,
                f"max_tokens {max_tokens} exceeds the {room} tokens left after the {n}-token prompt "
                f"(context {context})",
                max_tokens,
            )
        max_tokens = room
    vocab = engine.vocab_size
    if any(t < 0 or t >= vocab for t in prompt_ids):
        raise validation_error(prompt_field, f"token ids must be in [0, {vocab})")
    seq = Sequence(
        prompt_ids=list(prompt_ids),
        max_tokens=max_tokens,
        params=params,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        timeout=timeout,
        ignore_eos=ignore_eos,
    )
    seq.structured = structured
    return seq


def submit(engine: Engine, seqs: list[Sequence], group: int = 1) -> list[Generation]:
    """Queue `seqs` (all or none) and return their generations in order. With `group` > 1, each run of `group`
    consecutive sequences shares one prompt (OpenAI's `n`): it goes through `Engine.submit_group` (one prefill)
    and only its first generation counts the prompt in usage. Raises HTTPException 429 (queue full) or 503
    (engine not running); sequences queued before a refusal are cancelled."""
    gens = [Generation(engine, seq) for seq in seqs]
    done: list[Sequence] = []
    try:
        for start in range(0, len(seqs), group):
            chunk = seqs[start : start + group]
            for gen in gens[start + 1 : start + group]:
                gen.counts_prompt = False
            if group == 1:
                engine.submit(chunk[0])
            else:
                engine.submit_group(chunk)
            done += chunk
    except QueueFullError as e:
        for seq in done:
            engine.cancel(seq)
        raise HTTPException(429, f"server busy: {e}; retry later", headers={"Retry-After": "1"}) from e
    except EngineDeadError as e:
        for seq in done:
            engine.cancel(seq)
        raise HTTPException(503, f"{e}; retry later") from e
    return gens


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """The seeds of a request's n choices: seed, seed + 1, ... (wrapping within torch's 63 bits), or all None
    (each choice then draws from fresh entropy)."""
    if seed is None:
        return [None] * n
    return [(seed + j) % (2**63) for j in range(n)]


def start_generation(engine: Engine, prompt_ids: list[int], params: SamplingParams, **kwargs) -> Generation:
    """`build_sequence`, then `submit` it: one queued request."""
    return submit(engine, [build_sequence(engine, prompt_ids, params, **kwargs)])[0]
