"""POST /v1/generate: one JSON answer, or server-sent events (`token`* then `done`, or `error`)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response
from sse_starlette import ServerSentEvent

from service.deps import EngineDep, SettingsDep
from service.engine import FinishReason
from service.errors import ApiError
from service.generation import (
    CLIENT_CLOSED,
    EventStream,
    Generation,
    GenerationError,
    encode_prompt_async,
    finish_error,
    sampling_params,
    start_generation,
)
from service.logprobs import TokenText, generate_logprobs, token_text
from service.schemas import GenerateRequest, GenerateResponse

router = APIRouter(tags=["generate"])

_NAMED = (FinishReason.STOP, FinishReason.LENGTH, FinishReason.TIMEOUT)


def finish_name(reason: FinishReason) -> str:
    """stop, length, timeout (the engine's ABORT is a request timeout after the first token: /v1/generate keeps
    its documented `timeout` for it); any other end after the first token is `abort`."""
    if reason is FinishReason.ABORT:
        return "timeout"
    return reason.value if reason in _NAMED else "abort"


# exclude_unset: `logprobs` appears only when asked for, so the documented answer keeps its shape.
@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    response_model_exclude_unset=True,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"},
        400: {"description": "prompt does not fit the context"},
        429: {"description": "queue full"},
        503: {"description": "starting, draining, or the engine failed"},
        504: {"description": "timed out in the queue before the first token"},
    },
)
async def generate(body: GenerateRequest, request: Request, engine: EngineDep, settings: SettingsDep):
    prompt_ids = await encode_prompt_async(engine, body.prompt, body.chat)
    params = sampling_params(body, engine.vocab_size, logprobs=body.logprobs)
    texts = token_text(engine.tokenizer)
    gen = start_generation(
        engine,
        prompt_ids,
        params,
        max_tokens=body.max_tokens,
        max_tokens_explicit="max_tokens" in body.model_fields_set,
        stop=body.stop,
        timeout=settings.request_timeout,
        ignore_eos=body.ignore_eos,
    )
    if body.stream:
        return EventStream(sse_events(gen, texts), send_timeout=settings.sse_send_timeout)
    try:
        r = await gen.result(request)
    except GenerationError as e:
        raise ApiError(e.status, str(e)) from e
    if r is None:
        return Response(status_code=CLIENT_CLOSED)
    extra = {} if body.logprobs is None else {"logprobs": generate_logprobs(r.logprobs, texts)}
    return GenerateResponse(
        id=gen.id,
        text=r.text,
        finish_reason=finish_name(r.finish_reason),
        usage={"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens},
        timing={"ttft_ms": r.ttft_ms, "total_ms": r.total_ms},
        **extra,
    )


async def sse_events(gen: Generation, texts: TokenText | None = None):
    try:
        async for event in gen.events():
            if event.finish_reason is None:
                data = {"text": event.text, "index": event.index}
                if event.logprobs is not None and texts is not None:
                    data["logprobs"] = generate_logprobs([event.logprobs], texts)[0]
                yield ServerSentEvent(event="token", data=json.dumps(data))
                continue
            error = finish_error(gen, event)
            if error is not None:
                yield ServerSentEvent(event="error", data=json.dumps({"message": str(error), "status": error.status}))
            else:
                s = gen.summary("", event.finish_reason)
                yield ServerSentEvent(
                    event="done",
                    data=json.dumps(
                        {
                            "id": gen.id,
                            "finish_reason": finish_name(event.finish_reason),
                            "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens},
                            "timing": {"ttft_ms": s.ttft_ms, "total_ms": s.total_ms},
                        }
                    ),
                )
    except Exception as e:  # never cut a stream silently
        yield ServerSentEvent(event="error", data=json.dumps({"message": f"{type(e).__name__}: {e}"}))
