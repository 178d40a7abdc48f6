"""Liveness, readiness, Prometheus metrics and the playground page (all open without an API key)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


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
