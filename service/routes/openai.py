"""The OpenAI-compatible subset: /v1/completions, /v1/chat/completions (stream or not), /v1/models."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from sse_starlette import ServerSentEvent

from model.sampling import TokenLogprobs
from service.deps import EngineDep, SettingsDep
from service.engine import FinishReason
from service.errors import ApiError, error_body
from service.generation import (
    CLIENT_CLOSED,
    EventStream,
    Generation,
    GenerationError,
    GenerationResult,
    build_sequence,
    chat_ids_async,
    choice_seeds,
    encode_prompt_async,
    finish_error,
    gather_results,
    merged_events,
    sampling_params,
    structured_output_async,
    submit,
)
from service.logprobs import chat_logprobs, completion_logprobs, echo_logprobs, join_logprobs, token_text
from service.schemas import (
    MAX_PROMPTS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)

router = APIRouter(tags=["openai"])

_STREAM: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or `data:` chunks with stream=true"}
}


def _finish(reason: FinishReason) -> str:
    """OpenAI's stop and length; any other end after the first token (a timeout, an abort) is vLLM's `abort`."""
    if reason is FinishReason.STOP:
        return "stop"
    return "length" if reason is FinishReason.LENGTH else "abort"


SERVED_NAME = "smollm"  # always accepted as `model`: whatever checkpoint is served now, across hot reloads


def served_names(engine) -> set[str]:
    """The `model` values this server answers to: `smollm`, the checkpoint's name (what /v1/models lists) and,
    for a trainer's step-NNNNNN checkpoint, the run directory's name."""
    names = {SERVED_NAME, engine.info.name}
    path = Path(engine.info.checkpoint)
    if path.name.startswith("step-"):
        names.add(path.parent.name)
    return names


def check_model(body, engine) -> None:
    """404 `model_not_found` for a `model` this server does not serve."""
    if body.model is not None and body.model not in served_names(engine):
        raise ApiError(
            404,
            f"model {body.model!r} does not exist here; this server serves {engine.info.name!r} (or use "
            f"{SERVED_NAME!r})",
            param="model",
            code="model_not_found",
        )


def check_request(body, engine) -> None:
    """404 for a model this server does not serve; 400 naming the first field that asks for a feature this
    server does not implement (see schemas.UNSUPPORTED_FIELDS)."""
    check_model(body, engine)
    field = body.unsupported_field()
    if field is not None:
        raise ApiError(
            400,
            f"{field}: not supported by this server; leave it out (or at its default)",
            param=field,
            code="unsupported_parameter",
        )


def check_choices(engine, k: int, field: str, prompts: int = 1) -> None:
    """400 naming `field` when `k` sequences per prompt cannot run together (one cache slot each), or the request
    asks for more than MAX_PROMPTS sequences in all."""
    slots = engine.cache_manager.max_slots
    if k > slots:
        raise ApiError(
            400,
            f"{field}: {k} choices of one prompt run together and need as many batch slots; this "
            f"server has {slots} (SMOLLM_MAX_BATCH_SIZE)",
            param=field,
        )
    if k * prompts > MAX_PROMPTS:
        raise ApiError(
            400, f"{field}: {prompts} prompt(s) x {k} choices is over {MAX_PROMPTS} sequences a request", param=field
        )


def _usage(gens: list[Generation], scoring: bool = False) -> dict:
    """Prompt tokens counted once per distinct prompt sequence (the n choices of one prompt share it), completion
    tokens over every choice (none when `scoring`: echo with max_tokens 0 drops the one token it sampled)."""
    p = sum(g.prompt_tokens for g in gens if g.counts_prompt)
    c = 0 if scoring else sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@router.get("/v1/models", response_model=ModelList)
async def models(engine: EngineDep, request: Request) -> dict:
    # `root` names the checkpoint (its directory name, e.g. step-000123), never the server's filesystem path.
    precision = getattr(request.app.state, "precision", None)
    return {
        "object": "list",
        "data": [
            {
                "id": engine.info.name,
                "object": "model",
                "created": 0,
                "owned_by": "smollm",
                "root": engine.info.name,
                "smollm": precision.labels() if precision is not None else None,
            }
        ],
    }


@router.post("/v1/completions", response_model=CompletionResponse, responses=_STREAM)
async def completions(body: CompletionRequest, request: Request, engine: EngineDep, settings: SettingsDep):
    check_request(body, engine)
    # OpenAI's echo with max_tokens 0 scores the prompt and generates nothing. The engine always samples one token
    # after a prefill (at no extra forward pass); it is dropped, as vLLM does.
    scoring = body.max_tokens == 0
    if scoring and not body.echo:
        raise ApiError(
            400, "max_tokens: 0 generates nothing; it is only useful with echo (scoring the prompt)", param="max_tokens"
        )
    prompts = body.prompts()
    many = len(prompts) > 1
    n = body.n
    best_of = body.best_of or n
    if best_of < n:
        raise ApiError(400, f"best_of: must be >= n ({n}), got {best_of}", param="best_of")
    if best_of > n and body.stream:
        raise ApiError(
            400, "best_of: cannot stream when best_of > n (the best are known only at the end)", param="best_of"
        )
    check_choices(engine, best_of, "best_of" if body.best_of else "n", len(prompts))
    # Ranking by cumulative logprob needs each token's logprob even when the client asked for none.
    logprobs = body.logprobs if best_of == n or body.logprobs is not None else 0
    # With echo, the prompt's own tokens are scored too (from the prefill's logits; no prefix reuse for them).
    score_prompt = body.logprobs if body.echo else None
    structured = await structured_output_async(engine, body.response_format)
    texts, prompt_ids, seqs = [], [], []
    for i, prompt in enumerate(prompts):
        field = f"prompt.{i}" if many else "prompt"
        if isinstance(prompt, str):
            ids = await encode_prompt_async(engine, prompt, chat=False, field=field)
            text = prompt
        else:
            ids = list(prompt)
            text = None
        for seed in choice_seeds(body.seed, best_of):
            seq = build_sequence(
                engine,
                ids,
                sampling_params(body, engine.vocab_size, logprobs=None if scoring else logprobs, seed=seed),
                max_tokens=1 if scoring else body.max_tokens,
                max_tokens_explicit=body.max_tokens is not None,
                stop=body.stop,
                timeout=settings.request_timeout,
                prompt_field=field,
                ignore_eos=body.ignore_eos,
                structured=None if structured is None else structured.copy(),
            )
            seq.prompt_logprobs = score_prompt
            seqs.append(seq)
        if body.echo and text is None:
            text = await asyncio.to_thread(engine.tokenizer.decode, ids)
        texts += [text or ""] * n
        prompt_ids.append(ids)
    gens = submit(engine, seqs, group=best_of)
    created, model = int(time.time()), engine.info.name
    rid = f"cmpl-{gens[0].id}"
    echo = texts if body.echo else [""] * len(gens)
    token_texts = token_text(engine.tokenizer)
    offsets = [len(e) for e in echo]  # where each choice's next token starts in its text (text_offset)

    def prompt_lps(p: int) -> dict | None:
        """The echoed prompt `p`'s logprobs (None unless echo with logprobs). Its choices share one prefill: the
        sequence that computed it holds the scores (the others were given a copy of its KV)."""
        if score_prompt is None:
            return None
        group = gens[p * best_of : (p + 1) * best_of]
        scores = max((g.seq.prompt_token_logprobs for g in group), key=len)
        return echo_logprobs(prompt_ids[p], scores, token_texts)

    def choice_chunk(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }

    def chunk(index: int, text: str, finish: str | None, lp: TokenLogprobs | None = None) -> dict | None:
        if scoring:  # the token sampled after the prefill is not part of the answer
            return None if finish is None else choice_chunk(index, "", None, "length")
        logprobs = None
        if lp is not None:
            logprobs = completion_logprobs([lp], token_texts, offsets[index])
            offsets[index] += len(logprobs["tokens"][0])
        return choice_chunk(index, text, logprobs, finish)

    def opening(index: int) -> dict | None:
        """The echo chunk, sent just before the choice's first event: by then the prefill has scored the prompt."""
        return choice_chunk(index, echo[index], prompt_lps(index // best_of), None) if echo[index] else None

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(
            _openai_stream(
                gens, chunk, include_usage, rid, created, model, "text_completion", opening=opening, scoring=scoring
            ),
            send_timeout=settings.sse_send_timeout,
        )
    results = await _results(gens, request)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    ranked = list(enumerate(results))  # (index in gens, result)
    if best_of > n:  # keep each prompt's n best, best first

        def rank(kr: tuple[int, GenerationResult]) -> float:
            return -sum(lp.logprob for lp in kr[1].logprobs)

        ranked = [kr for s in range(0, len(ranked), best_of) for kr in sorted(ranked[s : s + best_of], key=rank)[:n]]
    choices = []
    for i, (k, r) in enumerate(ranked):
        lps = None
        if body.logprobs is not None:
            lps = completion_logprobs([] if scoring else r.logprobs, token_texts, len(echo[i]))
            if (scored := prompt_lps(k // best_of)) is not None:
                lps = join_logprobs(scored, lps)
        choices.append(
            {
                "index": i,
                "text": echo[i] + ("" if scoring else r.text),
                "finish_reason": "length" if scoring else _finish(r.finish_reason),
                "logprobs": lps,
            }
        )
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": _usage(gens, scoring=scoring),
    }


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_STREAM)
async def chat_completions(body: ChatCompletionRequest, request: Request, engine: EngineDep, settings: SettingsDep):
    check_request(body, engine)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids = await chat_ids_async(engine, messages)
    max_tokens: int | None
    if body.max_completion_tokens is not None:
        max_tokens, field = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, field = body.max_tokens, "max_tokens"
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
    params = sampling_params(body, engine.vocab_size, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    token_texts = token_text(engine.tokenizer)
    check_choices(engine, body.n, "n")
    structured = await structured_output_async(engine, body.response_format)
    seqs = [
        build_sequence(
            engine,
            prompt_ids,
            sampling_params(body, engine.vocab_size, logprobs=params.logprobs, seed=seed),
            max_tokens=max_tokens,
            max_tokens_explicit=max_tokens is not None,
            stop=body.stop,
            timeout=settings.request_timeout,
            max_tokens_field=field,
            prompt_field="messages",
            ignore_eos=body.ignore_eos,
            structured=None if structured is None else structured.copy(),
        )
        for seed in choice_seeds(body.seed, body.n)
    ]
    gens = submit(engine, seqs, group=body.n)
    created, model = int(time.time()), engine.info.name
    rid = f"chatcmpl-{gens[0].id}"
    started: set[int] = set()

    def chunk(index: int, text: str, finish: str | None, lp: TokenLogprobs | None = None) -> dict:
        delta: dict = {}
        if index not in started:
            delta["role"] = "assistant"
            started.add(index)
        if text or finish is None:
            delta["content"] = text
        logprobs = None if lp is None else chat_logprobs([lp], token_texts)
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(
            _openai_stream(gens, chunk, include_usage, rid, created, model, "chat.completion.chunk"),
            send_timeout=settings.sse_send_timeout,
        )
    results = await _results(gens, request)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(r.logprobs, token_texts) if body.logprobs else None,
                "finish_reason": _finish(r.finish_reason),
            }
            for i, r in enumerate(results)
        ],
        "usage": _usage(gens),
    }


async def _results(gens: list[Generation], request: Request):
    try:
        return await gather_results(gens, request)
    except GenerationError as e:
        raise ApiError(e.status, str(e)) from e


async def _openai_stream(
    gens: list[Generation],
    chunk,
    include_usage: bool,
    rid: str,
    created: int,
    model: str,
    obj: str,
    opening: Callable[[int], dict | None] | None = None,
    scoring: bool = False,
):
    """`data: {chunk}` lines: each choice's deltas as they come, tagged with its index (`opening(index)` first,
    when given and not None, just before the choice's first event; `chunk` returning None drops a delta), a chunk
    with finish_reason per choice, the usage chunk if asked, then `data: [DONE]`. An error in any choice ends the
    stream with an error chunk."""
    opened: set[int] = set()
    try:
        async for i, event in merged_events(gens):
            error = None if event.finish_reason is None else finish_error(gens[i], event)
            if error is not None:
                yield ServerSentEvent(data=json.dumps(error_body(error.status, str(error), openai=True)))
                break
            if opening is not None and i not in opened:
                opened.add(i)
                if (first := opening(i)) is not None:
                    yield ServerSentEvent(data=json.dumps(first))
            if event.finish_reason is None:
                data = chunk(i, event.text, None, event.logprobs)
            else:
                data = chunk(i, "", _finish(event.finish_reason))
            if data is not None:
                yield ServerSentEvent(data=json.dumps(data))
        else:
            if include_usage:
                yield ServerSentEvent(
                    data=json.dumps(
                        {
                            "id": rid,
                            "object": obj,
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": _usage(gens, scoring=scoring),
                        }
                    )
                )
    except Exception as e:  # never cut a stream silently
        yield ServerSentEvent(data=json.dumps(error_body(500, f"{type(e).__name__}: {e}", openai=True)))
    yield ServerSentEvent(data="[DONE]")
