"""Typed dependencies: route handlers reach the engine and settings through these, never through globals."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from service.engine import Engine, EngineDeadError
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    """The engine, or 503 while the model is loading, the server is shutting down, or the engine thread has died
    (a request queued to a dead engine would wait forever)."""
    state = request.app.state
    engine = getattr(state, "engine", None)
    if engine is None or getattr(state, "draining", False):
        raise HTTPException(503, "not ready (starting up or shutting down)", headers={"Retry-After": "5"})
    try:
        engine.check_alive()
    except EngineDeadError as e:
        raise HTTPException(503, f"{e}; the server needs a restart", headers={"Retry-After": "5"}) from e
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
