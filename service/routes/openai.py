"""The OpenAI-compatible subset: /v1/completions, /v1/chat/completions (stream or not), /v1/models."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastapi import APIRouter, Request, Response
from sse_starlette import ServerSentEvent

from service.deps import EngineDep, SettingsDep
from service.engine import FinishReason
from service.errors import ApiError, error_body
from service.generation import (
    CLIENT_CLOSED,
    EventStream,
    Generation,
    GenerationError,
    chat_ids_async,
    encode_prompt_async,
    finish_error,
    start_generation,
)
from service.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)

router = APIRouter(tags=["openai"])

_STREAM = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or `data:` chunks with stream=true"}}


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


def check_request(body, engine) -> None:
    """404 for a model this server does not serve; 400 naming the first field that asks for a feature this
    server does not implement (see schemas.UNSUPPORTED_FIELDS)."""
    if body.model is not None and body.model not in served_names(engine):
        raise ApiError(
            404, f"model {body.model!r} does not exist here; this server serves {engine.info.name!r} (or use "
            f"{SERVED_NAME!r})", param="model", code="model_not_found",
        )
    field = body.unsupported_field()
    if field is not None:
        raise ApiError(400, f"{field}: not supported by this server; leave it out (or at its default)",
                       param=field, code="unsupported_parameter")


def _usage(gen: Generation) -> dict:
    p, c = gen.prompt_tokens, gen.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@router.get("/v1/models", response_model=ModelList)
async def models(engine: EngineDep, request: Request) -> dict:
    # `root` names the checkpoint (its directory name, e.g. step-000123), never the server's filesystem path.
    precision = getattr(request.app.state, "precision", None)
    return {
        "object": "list",
        "data": [{"id": engine.info.name, "object": "model", "created": 0, "owned_by": "smollm",
                  "root": engine.info.name, "smollm": precision.labels() if precision is not None else None}],
    }


@router.post("/v1/completions", response_model=CompletionResponse, responses=_STREAM)
async def completions(body: CompletionRequest, request: Request, engine: EngineDep, settings: SettingsDep):
    check_request(body, engine)
    if isinstance(body.prompt, str):
        prompt_ids = await encode_prompt_async(engine, body.prompt, chat=False)
    else:
        prompt_ids = list(body.prompt)
    gen = _start(engine, settings, body, prompt_ids, body.max_tokens, "max_tokens")
    created, model = int(time.time()), engine.info.name
    rid = f"cmpl-{gen.id}"

    def chunk(text: str, finish: str | None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(_openai_stream(gen, chunk, include_usage, rid, created, model, "text_completion"),
                           send_timeout=settings.sse_send_timeout)
    r = await _result(gen, request)
    if r is None:
        return Response(status_code=CLIENT_CLOSED)
    out = chunk(r.text, _finish(r.finish_reason))
    out["usage"] = _usage(gen)
    return out


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_STREAM)
async def chat_completions(body: ChatCompletionRequest, request: Request, engine: EngineDep, settings: SettingsDep):
    check_request(body, engine)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids = await chat_ids_async(engine, messages)
    if body.max_completion_tokens is not None:
        max_tokens, field = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, field = body.max_tokens, "max_tokens"
    gen = _start(engine, settings, body, prompt_ids, max_tokens, field, prompt_field="messages")
    created, model = int(time.time()), engine.info.name
    rid = f"chatcmpl-{gen.id}"
    first = True

    def chunk(text: str, finish: str | None) -> dict:
        nonlocal first
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
            first = False
        if text or finish is None:
            delta["content"] = text
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(_openai_stream(gen, chunk, include_usage, rid, created, model, "chat.completion.chunk"),
                           send_timeout=settings.sse_send_timeout)
    r = await _result(gen, request)
    if r is None:
        return Response(status_code=CLIENT_CLOSED)
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                     "finish_reason": _finish(r.finish_reason)}],
        "usage": _usage(gen),
    }


def _start(engine, settings, body, prompt_ids: list[int], max_tokens: int | None, field: str,
           prompt_field: str = "prompt") -> Generation:
    return start_generation(
        engine, prompt_ids, max_tokens=max_tokens, max_tokens_explicit=max_tokens is not None,
        temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed, stop=body.stop,
        timeout=settings.request_timeout, max_tokens_field=field, prompt_field=prompt_field,
        ignore_eos=body.ignore_eos,
    )


async def _result(gen: Generation, request: Request):
    try:
        return await gen.result(request)
    except GenerationError as e:
        raise ApiError(e.status, str(e)) from e


async def _openai_stream(gen: Generation, chunk, include_usage: bool, rid: str, created: int, model: str,
                         obj: str):
    """`data: {chunk}` lines, a final chunk with finish_reason, the usage chunk if asked, then `data: [DONE]`."""
    try:
        async for event in gen.events():
            if event.finish_reason is None:
                yield ServerSentEvent(data=json.dumps(chunk(event.text, None)))
                continue
            error = finish_error(gen, event)
            if error is not None:
                yield ServerSentEvent(data=json.dumps(error_body(error.status, str(error), openai=True)))
            else:
                yield ServerSentEvent(data=json.dumps(chunk("", _finish(event.finish_reason))))
                if include_usage:
                    yield ServerSentEvent(data=json.dumps({"id": rid, "object": obj, "created": created,
                                                           "model": model, "choices": [], "usage": _usage(gen)}))
    except Exception as e:  # never cut a stream silently
        yield ServerSentEvent(data=json.dumps(error_body(500, f"{type(e).__name__}: {e}", openai=True)))
    yield ServerSentEvent(data="[DONE]")
