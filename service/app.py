"""The FastAPI application: `create_app(settings)`; the lifespan loads the model and runs the engine."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.checkpoints import resolve_checkpoint, step_of
from service.compute_threads import run_in_passing_thread_async
from service.engine import Engine
from service.engine.loop import ModelInfo
from service.metrics import Metrics
from service.middleware import AuthMiddleware, BodyLimitMiddleware, MetricsMiddleware
from service.reload import CheckpointWatcher
from service.routes import generate, health, openai
from service.settings import Settings

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA device is available")
    return torch.device(setting)


def make_loader(settings: Settings):
    from model.checkpoint import load_model
    from model.packed_linear import pack_linears
    from model.tokenizer import load_tokenizer

    device = pick_device(settings.device)
    dtype = DTYPES[settings.dtype]

    def load(path: Path):
        model = load_model(path, dtype=dtype, device=device)
        if settings.pack_weights:
            pack_linears(model)
        return model, load_tokenizer(path)

    return load


def build_engine(settings: Settings) -> tuple[Engine, CheckpointWatcher | None]:
    """Resolve and load the checkpoint, build the engine (and the watcher when a directory is watched)."""
    from model.bundled import default_checkpoint

    # Here, not on the event loop's thread: in PyTorch this starts an OpenMP pool in the calling thread (see
    # compute_threads.py). Threads started later, the engine's included, take the count from it.
    torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    resolved = resolve_checkpoint(settings.checkpoint)
    path = resolved.path or default_checkpoint()
    loader = make_loader(settings)
    model, tokenizer = loader(path)
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=settings.max_batch_size,
        max_context=settings.max_context,
        max_queue=settings.max_queue,
        prefill_chunk=settings.prefill_chunk,
        info=ModelInfo(str(path), resolved.step or step_of(path), path.name),
    )
    watcher = None
    if resolved.watch_dir is not None and settings.reload_interval > 0:
        watcher = CheckpointWatcher(resolved.watch_dir, engine, loader, settings.reload_interval, resolved.path)
    log.info("serving %s (%s, %s); KV cache %d slots x %d tokens = %.1f MiB", path, settings.dtype,
             model.device, settings.max_batch_size, engine.max_context, engine.runner.cache.nbytes / 2**20)
    return engine, watcher


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    engine, watcher = await run_in_passing_thread_async(build_engine, settings)
    app.state.metrics.bind(engine)
    engine.start(asyncio.get_running_loop())
    if watcher is not None:
        watcher.start()
    app.state.watcher = watcher
    app.state.engine = engine
    try:
        yield
    finally:
        app.state.draining = True
        if watcher is not None:
            await asyncio.to_thread(watcher.stop)
        await asyncio.to_thread(engine.stop)


def _error(status: int, message: str, param: str | None = None, headers=None, detail=None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": status}}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def _json_safe(value):
    """`value` with what strict JSON cannot carry made printable: non-finite floats (NaN, Infinity, 1e400) and
    strings UTF-8 cannot encode (lone surrogates) become strings, so echoing a rejected input never fails."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    messages, params = [], []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        field = "body" if e.get("type") == "json_invalid" else (".".join(loc) or "body")
        params.append(field)
        messages.append(f"{field}: {e.get('msg', 'invalid')}")
    return _error(422, "; ".join(messages), params[0] if params else None, detail=_json_safe(jsonable_encoder(errors)))


async def _http_handler(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="smollm",
        version="0.1.0",
        description="SmolLM2 inference with continuous batching: /v1/generate (SSE) and an OpenAI-compatible API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.engine = None
    app.state.draining = False
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(HTTPException, _http_handler)
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(openai.router)
    # Added innermost first: the body limit, then auth, then counting around everything.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None and settings.api_key.get_secret_value():
        app.add_middleware(AuthMiddleware, api_key=settings.api_key.get_secret_value())
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
