"""POST /tokenize and POST /detokenize in vLLM's shapes: what the server's tokenizer (and chat template) makes of
a text, and back. Tokenizing runs in a worker thread, off the event loop."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from service.deps import EngineDep
from service.errors import ApiError
from service.generation import chat_ids_async, check_prompt_chars
from service.routes.openai import check_model
from service.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter(tags=["tokenize"])


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, engine: EngineDep) -> dict:
    check_model(body, engine)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "prompt: give exactly one of `prompt` and `messages`", param="prompt")
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await chat_ids_async(engine, messages, body.add_generation_prompt)
    else:
        assert body.prompt is not None  # exactly one of the two, checked above
        check_prompt_chars(engine, len(body.prompt), "prompt")
        ids = await asyncio.to_thread(engine.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": list(ids), "count": len(ids), "max_model_len": engine.max_context}


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, engine: EngineDep) -> dict:
    check_model(body, engine)
    vocab = engine.vocab_size
    for i, t in enumerate(body.tokens):
        if not 0 <= t < vocab:
            raise ApiError(400, f"tokens.{i}: token id {t} is not in the vocabulary [0, {vocab})", param="tokens")
    return {"prompt": await asyncio.to_thread(engine.tokenizer.decode, body.tokens)}
