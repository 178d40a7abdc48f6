"""Liveness, readiness, Prometheus metrics and the playground page (all open without an API key)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """The process is alive and so is its engine: 503 with the reason when the engine thread died, or when work
    is pending and no engine step completed for the engine's stall_timeout (a liveness probe then restarts it).
    Before the engine exists (loading at start-up) the process alone answers."""
    engine = getattr(request.app.state, "engine", None)
    problem = engine.health() if engine is not None else None
    if problem is not None:
        return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """The model is loaded and the engine serving; 503 while starting up or draining after SIGTERM."""
    state = request.app.state
    engine = getattr(state, "engine", None)
    if engine is None or not engine.alive or getattr(state, "draining", False):
        return JSONResponse({"status": "not ready"}, status_code=503)
    return JSONResponse({"status": "ready", "checkpoint": engine.info.checkpoint, "step": engine.info.step})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(files("service").joinpath("static/index.html").read_text(encoding="utf-8"))
