"""The FastAPI application: `create_app(settings)`; the lifespan loads the model and runs the engine."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.compute_threads import run_in_passing_thread_async
from service.errors import install_error_handlers
from service.loading import build_engine, served_precision
from service.metrics import Metrics
from service.middleware import AuthMiddleware, BodyLimitMiddleware, InFlight, MetricsMiddleware
from service.routes import generate, health, openai, tokenize
from service.settings import Settings


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    engine, watcher = await run_in_passing_thread_async(build_engine, settings)
    # In a passing thread too: it asks oneDNN what the CPU computes, and the event loop's thread runs no torch.
    app.state.precision = await run_in_passing_thread_async(served_precision, settings, engine.runner.model)
    app.state.metrics.bind(engine, app.state.precision.labels())
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
    app.state.in_flight = InFlight()
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(openai.router)
    app.include_router(tokenize.router)
    # Added innermost first: the body limit, then auth, then counting around everything.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, read_timeout=settings.body_read_timeout)
    if settings.api_key is not None and settings.api_key.get_secret_value():
        app.add_middleware(AuthMiddleware, api_key=settings.api_key.get_secret_value())
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, in_flight=app.state.in_flight)
    return app
